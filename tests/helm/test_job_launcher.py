"""templates/job-launcher.yaml: the in-cluster `run-all --backend k8s`.

Its image, resources, retries, deadline and security context are KubernetesConfig's
settings (values.kubernetes); these tests check the template reads them as the Job
builder's model defines them.
"""

from __future__ import annotations

import json

import pytest

from trackb_core.errors import EXIT_STAGE_FAILED, EXIT_TERMINATED, PERMANENT_EXIT_CODES

from . import CHART, find, one, pod_spec, render, render_ci


def launcher(values: str = "default-values", sets: tuple[str, ...] = ()) -> dict:
    return one(render_ci(values, sets), "Job", "launcher")


def settings():
    from trackb_core.k8s.settings import KubernetesConfig

    return KubernetesConfig()


def test_launcher_is_off_unless_enabled():
    assert not find(render(), "Job")
    assert not find(render_ci("rbac-only-values"), "Job")


def test_launcher_runs_run_all_on_the_k8s_backend():
    job = launcher("minio-values")
    spec = pod_spec(job)
    container = spec["containers"][0]
    assert container["command"] == [
        "python", "-m", "jobs.run_all", "--config", "/etc/trackb/pipeline.yaml",
        "--backend", "k8s", "--run-id", "kind-e2e", "--set", "train.epochs=1"]
    assert job["metadata"]["labels"]["trackb/run-id"] == "kind-e2e"
    assert job["metadata"]["labels"]["trackb/stage"] == "launcher"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/trackb"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/trackb"]["name"]]["configMap"]["name"] == "demo-trackb-pipeline"


@pytest.mark.parametrize(("sets", "registry", "cpu"), [
    ((), None, None),
    (("kubernetes.images.registry=",), "", None),
    (("kubernetes.images.registry=reg.example/x/",), "reg.example/x/", None),
    (("kubernetes.images.cpu=trackb-cpu@sha256:" + "a" * 64,), None, "trackb-cpu@sha256:" + "a" * 64),
    (("kubernetes.images.cpu=other/cpu:7",), None, "other/cpu:7"),
])
def test_cpu_image_reference_is_built_as_images_config_ref_builds_it(sets, registry, cpu):
    images = settings().images
    update = {k: v for k, v in (("registry", registry), ("cpu", cpu)) if v is not None}
    images = images.model_copy(update=update)
    container = pod_spec(launcher(sets=sets))["containers"][0]
    assert container["image"] == images.ref(images.cpu)
    assert container["imagePullPolicy"] == images.pull_policy


def test_run_id_defaults_to_the_release_name_and_the_job_name_to_the_revision():
    job = launcher()
    assert job["metadata"]["name"] == "demo-trackb-launcher-1"
    assert pod_spec(job)["containers"][0]["command"][-2:] == ["--run-id", "demo"]


def test_launcher_uses_the_service_account_and_mounts_its_token():
    spec = pod_spec(launcher())
    assert spec["serviceAccountName"] == settings().service_account
    assert spec["automountServiceAccountToken"] is True
    assert spec["restartPolicy"] == "Never"


def test_s3_credentials_only_through_secret_key_refs():
    env = pod_spec(launcher())["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    s3 = settings().s3
    for name, key in (("AWS_ACCESS_KEY_ID", s3.access_key_id_key),
                      ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key_key)):
        assert set(by_name[name]) == {"name", "valueFrom"}
        assert by_name[name]["valueFrom"] == {"secretKeyRef": {"name": "trackb-s3", "key": key}}
    assert by_name["TRACKB_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert by_name["AWS_DEFAULT_REGION"]["value"] == s3.region
    for item in env:  # nothing secret-looking has a literal value
        if any(word in item["name"] for word in ("SECRET", "KEY", "TOKEN", "PASSWORD")):
            assert "value" not in item, item["name"]


def test_without_a_secret_no_credentials_are_injected():
    job = launcher("eks-values")  # S3 through the pod's IAM role
    names = {e["name"] for e in pod_spec(job)["containers"][0]["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "secretKeyRef" not in json.dumps(job)


def test_security_context_is_locked_down_with_a_writable_tmp():
    security = settings().security
    spec = pod_spec(launcher())
    pod_ctx = spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert (pod_ctx["runAsUser"], pod_ctx["runAsGroup"], pod_ctx["fsGroup"]) == (
        security.run_as_user, security.run_as_group, security.fs_group)
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    container = spec["containers"][0]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx.get("privileged", False) is False
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_resources_are_the_shared_launcher_resources():
    wanted = settings().resources.launcher
    resources = pod_spec(launcher())["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": wanted.cpu_request, "memory": wanted.memory_request,
                     "ephemeral-storage": wanted.ephemeral_storage},
        "limits": {"cpu": wanted.cpu_limit, "memory": wanted.memory_limit,
                   "ephemeral-storage": wanted.ephemeral_storage},
    }


def test_failure_policy_deadline_and_ttl_are_the_shared_job_policy():
    policy = settings().job
    spec = launcher()["spec"]
    assert spec["backoffLimit"] == policy.backoff_limit
    assert spec["activeDeadlineSeconds"] == policy.deadlines.launcher
    assert spec["ttlSecondsAfterFinished"] == policy.ttl_seconds_after_finished
    rules = spec["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["containerName"] == "launcher"
    assert fail["onExitCodes"]["operator"] == "In"
    assert fail["onExitCodes"]["values"] == policy.permanent_exit_codes
    assert set(fail["onExitCodes"]["values"]) == set(PERMANENT_EXIT_CODES)
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_a_failed_stage_is_not_retried_by_the_launcher_job():
    # The launcher exits 80 when a stage failed for good; a retry of the launcher Job
    # would rerun that stage with its own retries (up to 9 GPU pods per failure).
    rules = launcher()["spec"]["podFailurePolicy"]["rules"]
    failing = {code for r in rules if r["action"] == "FailJob"
               for code in r["onExitCodes"]["values"]}
    assert EXIT_STAGE_FAILED in failing and EXIT_TERMINATED not in failing
    # The builder's launcher Job (trackb render) says the same.
    from trackb_core.config import build_config
    from trackb_core.k8s.jobspec import build_launcher_job
    from trackb_core.pipeline import PipelineConfig

    job = build_launcher_job(build_config(PipelineConfig, {"store": "s3://b/p"}), "demo")[-1]
    codes = {code for r in job["spec"]["podFailurePolicy"]["rules"]
             if r["action"] == "FailJob" for code in r["onExitCodes"]["values"]}
    assert EXIT_STAGE_FAILED in codes and EXIT_TERMINATED not in codes


def test_cpu_node_placement_and_pull_secrets_come_from_the_shared_settings():
    spec = pod_spec(launcher("gpu-values"))
    assert spec["nodeSelector"] == {"pool": "cpu"}
    assert spec["priorityClassName"] == "trackb-batch"
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert "tolerations" not in spec  # the GPU tolerations are for GPU pods only
    assert spec["containers"][0]["image"] == (
        "registry.example.com/ml/trackb/trackb-cpu:0.1.0")


def test_values_yaml_names_no_credentials():
    text = (CHART / "values.yaml").read_text(encoding="utf-8").lower()
    for word in ("password:", "secret_access_key:", "aws_secret_access_key:", "token:"):
        assert word not in text


def test_the_launcher_knows_its_own_job_as_the_job_builder_tells_it():
    # Its Job owns the vLLM server it creates: the server goes with the launcher Job.
    from trackb_core.k8s.jobspec import LAUNCHER_JOB_ENV

    env = {e["name"]: e for e in pod_spec(launcher())["containers"][0]["env"]}
    for name, label in LAUNCHER_JOB_ENV.items():
        assert env[name]["valueFrom"] == {"fieldRef": {
            "fieldPath": f"metadata.labels['{label}']"}}
