"""templates/serviceaccount-launcher.yaml."""

from __future__ import annotations

from . import CHART, find, one, pod_spec, render, render_ci


def test_service_account_is_named_by_the_shared_settings_and_mounts_no_token():
    from trackb_core.k8s.settings import KubernetesConfig

    account = one(render_ci("default-values"), "ServiceAccount", "launcher")
    assert account["metadata"]["name"] == KubernetesConfig().service_account
    assert account["automountServiceAccountToken"] is False


def test_annotations_for_a_cloud_identity_pass_through():
    account = one(render_ci("eks-values"), "ServiceAccount", "launcher")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]


def test_an_existing_service_account_is_used_not_created():
    objects = render(CHART / "ci" / "default-values.yaml",
                     sets=("serviceAccount.create=false", "kubernetes.service_account=ops-trackb"))
    assert not find(objects, "ServiceAccount")
    assert one(objects, "RoleBinding", "launcher")["subjects"][0]["name"] == "ops-trackb"
    assert pod_spec(one(objects, "Job", "launcher"))["serviceAccountName"] == "ops-trackb"
