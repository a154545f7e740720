"""templates/networkpolicy-cleanup.yaml: the pre-delete hook's pod refuses ingress."""

from __future__ import annotations

from . import find, one, render_ci


def test_the_hook_pod_refuses_ingress_and_reaches_the_api_from_just_before_it_starts():
    objects = render_ci("minio-values")
    policy = one(objects, "NetworkPolicy", "cleanup")
    job = one(objects, "Job", "cleanup")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy["spec"] and policy["spec"]["egress"] == [{}]
    annotations = policy["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    # Helm runs hooks by weight: the policy exists before the hook Job's pod.
    assert int(annotations["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))


def test_no_policy_without_the_hook_or_without_network_policies():
    assert not find(render_ci("minio-values", ("cleanup.enabled=false",)), "NetworkPolicy",
                    "cleanup")
    assert not find(render_ci("minio-values", ("kubernetes.network.enabled=false",)),
                    "NetworkPolicy", "cleanup")
