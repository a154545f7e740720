"""templates/role-launcher.yaml and rolebinding-launcher.yaml: least privilege, no wildcards."""

from __future__ import annotations

import json

from trackb_core.k8s.client import RBAC_RULES

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
    assert not any("secrets" in r["resources"] for r in role["rules"])
    assert all(set(r) <= {"apiGroups", "resources", "verbs"} for r in role["rules"]), \
        "no resourceNames/nonResourceURLs tricks"


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
