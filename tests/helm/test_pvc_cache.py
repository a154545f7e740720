"""templates/pvc-cache.yaml: the model cache PVC (kubernetes.cache.pvc) the chart may create.

With a hub model, a run's warm-cache step fills it once and train and predict load the
model offline from it (trackb_core.warmcache).
"""

from __future__ import annotations

import pytest

from . import CHART, NAMESPACE, find, one, render, render_ci, run_helm

CACHE = ("cacheVolume.create=true", "kubernetes.cache.pvc=model-cache")


def test_the_claim_is_named_kubernetes_cache_pvc_and_shared_by_many_nodes_by_default():
    pvc = one(render(sets=CACHE), "PersistentVolumeClaim", "cache")
    assert pvc["metadata"]["name"] == "model-cache"
    assert pvc["metadata"]["namespace"] == NAMESPACE
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert "storageClassName" not in pvc["spec"]  # the cluster's default class


def test_storage_class_size_and_access_modes_are_the_values():
    pvc = one(render(sets=(*CACHE, "cacheVolume.storageClassName=filestore-rwx",
                           "cacheVolume.size=200Gi",
                           "cacheVolume.accessModes={ReadWriteOnce}")),
              "PersistentVolumeClaim", "cache")
    assert pvc["spec"]["storageClassName"] == "filestore-rwx"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_no_claim_unless_asked():
    assert not find(render(sets=("kubernetes.cache.pvc=model-cache",)),
                    "PersistentVolumeClaim")


def test_a_claim_without_a_name_fails_at_render_time_naming_the_key():
    result = run_helm("template", "demo", str(CHART), "--set", "cacheVolume.create=true")
    assert result.returncode != 0
    assert "cacheVolume.create needs kubernetes.cache.pvc" in result.stderr


@pytest.mark.parametrize("size", ["50", "lots", "50 Gi"])
def test_the_schema_refuses_a_size_that_is_not_a_quantity(size):
    result = run_helm("template", "demo", str(CHART), "--set", CACHE[0], "--set", CACHE[1],
                      "--set-string", f"cacheVolume.size={size}")
    assert result.returncode != 0 and "size" in result.stderr


def test_the_launcher_reads_the_claim_it_is_told_to_use():
    # The pipeline the chart's launcher runs names the same claim.
    import yaml

    objects = render_ci("minio-values", sets=CACHE)
    config_map = one(objects, "ConfigMap", "pipeline")
    pipeline = yaml.safe_load(config_map["data"]["pipeline.yaml"])
    assert pipeline["kubernetes"]["cache"]["pvc"] == "model-cache"
    assert one(objects, "PersistentVolumeClaim", "cache")["metadata"]["name"] == "model-cache"
