"""templates/role-launcher.yaml and rolebinding-launcher.yaml: least privilege, no wildcards."""

from __future__ import annotations

import json

import pytest
import yaml

from trackb_core.k8s.client import NAMED_ONLY, RBAC_RULES
from trackb_core.k8s.jobspec import secret_names
from trackb_core.k8s.settings import KubernetesConfig

from . import CHART, NAMESPACE, find, one, render, render_ci

# What the launcher calls: nothing more may be granted. The single source: every call the launcher makes (trackb_core/k8s/client.py).
EXPECTED = {key: set(verbs) for key, verbs in RBAC_RULES.items()}


def granted(role: dict) -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_role_grants_exactly_the_launchers_calls_and_no_wildcard():
    role = one(render_ci("default-values"), "Role", "launcher")
    assert "*" not in json.dumps(role)
    assert granted(role) == EXPECTED
    for rule in role["rules"]:
        named = {(g, r) for g in rule["apiGroups"] for r in rule["resources"]} <= NAMED_ONLY
        assert set(rule) == {"apiGroups", "resources", "verbs"} | (
            {"resourceNames"} if named else set()), "no nonResourceURLs tricks"


def settings(objects) -> KubernetesConfig:
    """The kubernetes section of the pipeline the chart renders for the launcher."""
    pipeline = yaml.safe_load(one(objects, "ConfigMap", "pipeline")["data"]["pipeline.yaml"])
    return KubernetesConfig.model_validate(pipeline["kubernetes"])


@pytest.mark.parametrize("values, sets", [
    ("default-values", ()), ("gpu-values", ()), ("minio-values", ()),
    ("default-values", ("kubernetes.huggingface.token_optional=false",
                        "kubernetes.images.pull_secrets={registry-creds,trackb-s3}"))])
def test_secrets_are_readable_only_by_the_names_the_builder_checks(values, sets):
    objects = render_ci(values, sets=sets)
    rules = [r for r in one(objects, "Role", "launcher")["rules"]
             if "secrets" in r["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["secrets"],
                      "resourceNames": secret_names(settings(objects)), "verbs": ["get"]}]


def test_no_secret_names_grant_no_secret_at_all():
    # An empty resourceNames would grant every Secret of the namespace.
    objects = render_ci("eks-values", sets=("kubernetes.images.pull_secrets=null",))
    assert secret_names(settings(objects)) == []
    role = one(objects, "Role", "launcher")
    assert not any("secrets" in r["resources"] for r in role["rules"])


def test_role_is_namespaced_and_bound_to_the_launcher_service_account():
    objects = render_ci("default-values")
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    role = one(objects, "Role", "launcher")
    binding = one(objects, "RoleBinding", "launcher")
    account = one(objects, "ServiceAccount", "launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]


def test_rbac_create_false_renders_no_role():
    objects = render(CHART / "ci" / "default-values.yaml", sets=("rbac.create=false",))
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
