"""templates/configmap-pipeline.yaml: the pipeline.yaml the launcher runs."""

from __future__ import annotations

import yaml

from . import CHART, NAMESPACE, one, render, render_ci


def pipeline_yaml(objects) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "pipeline")["data"]["pipeline.yaml"])


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))


def test_pipeline_values_pass_through_with_the_store_resolved():
    data = pipeline_yaml(render_ci("default-values"))
    assert data["store"] == "s3://trackb-artifacts/team-a"
    assert data["corpus"] == values()["pipeline"]["corpus"]
    assert "run_id" not in data and "backend" not in data  # on the launcher's command line


def test_an_empty_store_falls_back_to_the_kubernetes_store():
    data = pipeline_yaml(render_ci("rbac-only-values"))
    assert data["store"] == values()["kubernetes"]["s3"]["store"]


def test_kubernetes_section_is_the_values_with_the_release_namespace():
    data = pipeline_yaml(render_ci("default-values"))
    expected = values()["kubernetes"]
    expected["namespace"] = NAMESPACE  # the Role is granted there and nowhere else
    expected["s3"].update(endpoint_url="http://minio.storage.svc:9000",
                          credentials_secret="trackb-s3")
    assert data["kubernetes"] == expected


def test_dev_minio_becomes_the_store_and_the_network_policy_target():
    data = pipeline_yaml(render_ci("minio-values"))
    assert data["store"] == "s3://trackb-dev"
    s3 = data["kubernetes"]["s3"]
    assert s3["store"] == "s3://trackb-dev"
    assert s3["endpoint_url"] == f"http://demo-trackb-minio.{NAMESPACE}.svc:9000"
    network = data["kubernetes"]["network"]
    assert network["store_namespace"] == NAMESPACE
    assert network["store_pod_labels"]["app.kubernetes.io/component"] == "minio-dev-only"
    assert data["extract"] == {"max_functions": 150}


def test_an_explicit_store_wins_over_minio():
    data = pipeline_yaml(render(CHART / "ci" / "minio-values.yaml",
                                sets=("pipeline.store=s3://elsewhere/x",)))
    assert data["store"] == "s3://elsewhere/x"
