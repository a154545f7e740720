"""templates/job-cleanup.yaml: `helm uninstall` deletes the run's Jobs first.

A pre-delete hook runs `trackb delete <run id>` with the launcher's identity, so that no
stage Job of the release outlives it on a GPU (helm alone deletes only the launcher Job).
"""

from __future__ import annotations

from . import find, one, pod_spec, render, render_ci


def hook(values: str = "minio-values", sets: tuple[str, ...] = ()) -> dict:
    return one(render_ci(values, sets), "Job", "cleanup")


def test_uninstall_first_runs_trackb_delete_of_the_releases_run_with_the_charts_pipeline():
    job = hook()
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-delete"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = pod_spec(job)
    container = spec["containers"][0]
    assert container["command"] == ["python", "-m", "trackb_core.cli", "delete", "kind-e2e",
                                    "--config", "/etc/trackb/pipeline.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/trackb"]]["configMap"]["name"] == "demo-trackb-pipeline"


def test_the_hook_runs_as_the_launcher_whose_role_grants_the_deletes():
    launcher = one(render_ci("minio-values"), "Job", "launcher")
    spec = pod_spec(hook())
    assert spec["serviceAccountName"] == pod_spec(launcher)["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is True
    assert spec["restartPolicy"] == "Never"


def test_the_hook_is_not_one_of_the_runs_jobs_so_it_does_not_delete_itself():
    job = hook()
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert not any(key.startswith("trackb/") for key in labels)


def test_the_hook_pod_is_as_locked_down_as_the_launcher():
    launcher = pod_spec(one(render_ci("minio-values"), "Job", "launcher"))
    spec = pod_spec(hook())
    assert spec["securityContext"] == launcher["securityContext"]
    assert spec["containers"][0]["securityContext"] == launcher["containers"][0][
        "securityContext"]
    assert spec["containers"][0]["image"] == launcher["containers"][0]["image"]


def test_retries_and_deadline_are_the_cleanup_values():
    job = hook(sets=("cleanup.backoffLimit=5", "cleanup.activeDeadlineSeconds=900"))
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["activeDeadlineSeconds"] == 900
    defaults = hook()
    assert (defaults["spec"]["backoffLimit"], defaults["spec"]["activeDeadlineSeconds"]) == (
        2, 600)


def test_no_hook_without_the_launcher_or_when_cleanup_is_disabled():
    assert not find(render(), "Job", "cleanup")
    assert not find(render_ci("rbac-only-values"), "Job", "cleanup")
    assert not find(render_ci("minio-values", ("cleanup.enabled=false",)), "Job", "cleanup")
