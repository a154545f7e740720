"""templates/deployment-minio.yaml and service-minio.yaml: the dev-only MinIO."""

from __future__ import annotations

from . import NAMESPACE, find, one, pod_spec, render, render_ci


def test_minio_is_off_by_default_and_labelled_dev_only_when_on():
    assert not find(render(), "Deployment")
    objects = render_ci("minio-values")
    deployment = one(objects, "Deployment", "minio-dev-only")
    service = one(objects, "Service", "minio-dev-only")
    for obj in (deployment, service):
        assert obj["metadata"]["annotations"]["trackb/dev-only"] == "true"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 9000


def test_minio_credentials_come_from_the_existing_secret_only():
    container = pod_spec(one(render_ci("minio-values"), "Deployment", "minio-dev-only"))[
        "containers"][0]
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID"),
                      ("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY")):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "trackb-minio-root",
                                                          "key": key}
    assert ":latest" not in container["image"]
    assert "/data/trackb-dev" in container["args"][0]  # the bucket exists at start


def test_minio_runs_locked_down():
    spec = pod_spec(one(render_ci("minio-values"), "Deployment", "minio-dev-only"))
    from trackb_core.k8s.settings import KubernetesConfig

    security = KubernetesConfig().security
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == security.run_as_user
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    ctx = spec["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}


def test_the_launcher_talks_to_the_dev_minio():
    objects = render_ci("minio-values")
    env = {e["name"]: e.get("value") for e in
           pod_spec(one(objects, "Job", "launcher"))["containers"][0]["env"]}
    service = one(objects, "Service", "minio-dev-only")["metadata"]["name"]
    assert env["TRACKB_S3_ENDPOINT_URL"] == f"http://{service}.{NAMESPACE}.svc:9000"
