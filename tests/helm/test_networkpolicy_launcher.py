"""templates/networkpolicy-launcher.yaml: the launcher pod refuses ingress, like every
stage pod."""

from __future__ import annotations

from . import CHART, find, one, render

DEFAULTS = CHART / "ci" / "default-values.yaml"


def test_it_selects_the_launcher_pod_and_refuses_ingress():
    objects = render(DEFAULTS)
    policy = one(objects, "NetworkPolicy", "launcher")["spec"]
    pod_labels = one(objects, "Job", "launcher")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy
    assert policy["egress"] == [{}]  # the API server and the store: addresses vary


def test_none_without_the_launcher_or_with_network_policies_off():
    assert not find(render(CHART / "ci" / "rbac-only-values.yaml"), "NetworkPolicy", "launcher")
    assert not find(render(DEFAULTS, sets=("kubernetes.network.enabled=false",)),
                    "NetworkPolicy", "launcher")
