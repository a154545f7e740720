"""templates/serviceaccount-stages.yaml: the stage pods' own, annotated identity."""

from __future__ import annotations

import pytest

from . import CHART, find, one, render, run_helm

DEFAULTS = CHART / "ci" / "default-values.yaml"


def test_no_stage_service_account_unless_asked():
    assert not find(render(DEFAULTS), "ServiceAccount", "stages")


def test_it_is_named_by_job_service_account_annotated_and_mounts_no_token():
    objects = render(DEFAULTS, sets=(
        "stageServiceAccount.create=true", "kubernetes.job_service_account=ml-stages",
        "stageServiceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/r"))
    account = one(objects, "ServiceAccount", "stages")
    assert account["metadata"]["name"] == "ml-stages"
    assert account["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    assert account["automountServiceAccountToken"] is False
    # No Role is bound to it: stage pods never call the API.
    assert all(b["subjects"][0]["name"] != "ml-stages" for b in find(objects, "RoleBinding"))


@pytest.mark.parametrize(("sets", "message"), [
    (("stageServiceAccount.create=true",), "needs kubernetes.job_service_account"),
    (("stageServiceAccount.create=true", "kubernetes.job_service_account=trackb-launcher"),
     "must differ from kubernetes.service_account"),
])
def test_a_missing_or_shared_name_fails_at_render_time(sets, message):
    args = ["template", "demo", str(CHART), "--values", str(DEFAULTS)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
