"""Preflight against the API emulator: what would stop a run, before its first Job.

The emulator (conftest.py) holds the objects a test puts there, answers
SelfSubjectAccessReviews from a deny set and answers 403 for the kinds a test forbids.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trackb_core.config import build_config, load_yaml, merge, parse_dotted_overrides
from trackb_core.errors import ConfigError
from trackb_core.k8s import jobspec
from trackb_core.k8s.client import OUTSIDE_ROLE, RBAC_RULES
from trackb_core.k8s.preflight import Finding, check, preflight
from trackb_core.pipeline import PipelineConfig
from trackb_core.stages import step

pytest.importorskip("kmock", reason="kmock (the Kubernetes API emulator) is not installed")
pytest.importorskip("kubernetes", reason="the kubernetes client is not installed")

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "jobs" / "configs" / "cluster-gpu.yaml"
NAMESPACE = "trackb-test"
RUN = "pf"


def config(*sets: str) -> PipelineConfig:
    values = merge(load_yaml(GPU), parse_dotted_overrides(
        [f"kubernetes.namespace={NAMESPACE}", *sets]))
    return build_config(PipelineConfig, values)


def cluster(emulator, *, secret: bool = True, gpu_node: bool = True) -> None:
    """What cluster-gpu.yaml needs: the S3 Secret with its keys and a T4 node."""
    if secret:
        emulator.put("", "secrets", {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "trackb-s3", "namespace": NAMESPACE},
            "data": {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}})
    if gpu_node:
        emulator.put("", "nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": "t4-1", "labels": {"nvidia.com/gpu.product": "Tesla-T4"}}})


def levels(findings: list[Finding], level: str) -> list[str]:
    return [f.message for f in findings if f.level == level]


def created_nothing(emulator) -> None:
    """Only access reviews were POSTed, and no Job or ConfigMap exists anywhere."""
    creates = {(group, resource) for group, resource, verb in emulator.calls()
               if verb == "create"}
    assert creates <= {("authorization.k8s.io", "selfsubjectaccessreviews")}
    assert not [key for key in emulator.handler.objects
                if key[0].plural in ("jobs", "configmaps") and key[1] == NAMESPACE]


def test_a_clean_config_passes_with_no_errors_and_calls_only_what_it_may(emulator):
    cluster(emulator)
    findings = check(config(), RUN, emulator.client())
    assert findings == []
    created_nothing(emulator)
    for group, resource, verb in emulator.calls():
        allowed = RBAC_RULES.get((group, resource), set()) | OUTSIDE_ROLE.get(
            (group, resource), set())
        assert verb in allowed, (group, resource, verb)
    # Every grant of the Role was reviewed, the Secret by its name.
    assert ("authorization.k8s.io", "selfsubjectaccessreviews", "create") in emulator.calls()


def test_emulator_provide_puts_everything_a_config_names(emulator):
    full = config("kubernetes.cache.pvc=model-cache", "kubernetes.images.pull_secrets=[reg]",
                  "kubernetes.huggingface.token_optional=false",
                  "kubernetes.scheduling.priority_class_name=batch-low",
                  "kubernetes.sandbox.runtime_class_name=gvisor")
    emulator.provide(full)
    assert preflight(full, RUN, emulator.client()) == []


def test_preflight_refuses_before_creating_anything_a_missing_secret_pvc_priority_class_and_a_model_an_offline_pod_cannot_find_and_warns_on_no_gpu_node(  # noqa: E501
        emulator, capsys):
    cluster(emulator, secret=False, gpu_node=False)
    bad = config("model=./models/qwen2.5-coder-1.5b", "kubernetes.cache.pvc=model-cache",
                 "kubernetes.scheduling.priority_class_name=batch-low")
    with pytest.raises(ConfigError) as refused:
        check(bad, RUN, emulator.client())
    lines = str(refused.value).splitlines()
    assert lines[0] == "preflight found 6 error(s), so nothing was created:"
    assert [line.strip() for line in lines[1:]] == [
        *(f"{stage} pods do not see this machine's files, so the model must be in the store "
          "or on a cache PVC: put './models/qwen2.5-coder-1.5b' in the store (model: "
          "s3://...) or on kubernetes.cache.pvc (model: /cache/...)"
          for stage in ("train", "predict-baseline", "predict-post")),
        f"Secret trackb-s3 (kubernetes.s3.credentials_secret) does not exist in namespace "
        f"{NAMESPACE}",
        f"PersistentVolumeClaim model-cache (kubernetes.cache.pvc) does not exist in "
        f"namespace {NAMESPACE} (the chart creates it with cacheVolume.create)",
        "PriorityClass batch-low (kubernetes.scheduling.priority_class_name) does not exist "
        "in the cluster"]
    warning = capsys.readouterr().err
    assert "[preflight] warning: no node matches kubernetes.scheduling.node_selector " \
           "(nvidia.com/gpu.product=Tesla-T4)" in warning
    created_nothing(emulator)
    client = emulator.client()
    assert client.list_jobs(NAMESPACE, {})[0] == []
    assert client.get("ConfigMap", NAMESPACE, jobspec.object_name(RUN, "train-config")) is None


def test_each_stage_a_builder_rule_stops_gets_its_own_line(emulator):
    cluster(emulator)
    findings = preflight(config("kubernetes.network.store_namespace="), RUN,
                         emulator.client())
    assert levels(findings, "error") == [
        f"kubernetes.network: set store_namespace or store_cidrs, or {stage} pods cannot "
        "reach the object store" for stage in ("build-dataset", "eval-baseline", "eval-post")]


def test_an_error_that_stops_every_stage_is_one_line_without_stage_names(emulator):
    cluster(emulator)
    findings = preflight(config(), "Not_A_Run_Id", emulator.client())
    (error,) = levels(findings, "error")
    assert error.startswith("run id 'Not_A_Run_Id' must be")


def test_a_model_folder_pods_can_only_find_in_their_image_is_a_warning(emulator):
    cluster(emulator)
    findings = preflight(config("model=/models/qwen"), RUN, emulator.client())
    assert levels(findings, "error") == []
    (warning,) = levels(findings, "warning")
    assert warning.startswith("model /models/qwen is a folder outside /cache")
    on_cache = config("model=/cache/models/qwen", "kubernetes.cache.pvc=model-cache")
    emulator.put("", "persistentvolumeclaims", {"metadata": {
        "name": "model-cache", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteMany"]}})
    assert preflight(on_cache, RUN, emulator.client()) == []


def test_the_offline_rule_lets_a_pod_without_egress_load_only_a_stored_or_cached_model():
    # No step both loads the model and runs model code today (predict and eval are split),
    # so the rule is checked on such a step directly.
    locked = dataclasses.replace(step("predict-baseline"), runs_model_code=True)
    with pytest.raises(ConfigError, match="predict-baseline pods are offline, so the model "
                                          "must be in the store or on a cache PVC"):
        jobspec.check_model_source(config("model=Qwen/Qwen2.5-Coder-1.5B"), locked,
                                   offline=True)
    jobspec.check_model_source(config("model=Qwen/Qwen2.5-Coder-1.5B",
                                      "kubernetes.cache.pvc=model-cache"), locked, offline=True)
    jobspec.check_model_source(config(), locked, offline=True)  # s3://
    jobspec.check_model_source(config("model=Qwen/Qwen2.5-Coder-1.5B"), locked, offline=False)


def test_a_denied_permission_is_an_error_line(emulator):
    cluster(emulator)
    emulator.denied |= {("batch", "jobs", "create"), ("", "pods/log", "get"),
                        ("", "secrets", "get")}
    findings = preflight(config(), RUN, emulator.client())
    assert levels(findings, "error") == [
        f"the launcher may not get pods/log in namespace {NAMESPACE}",
        f"the launcher may not get secrets trackb-s3 in namespace {NAMESPACE}",
        f"the launcher may not create jobs in namespace {NAMESPACE}"]


def test_forbidden_reads_are_skipped_not_errors(emulator):
    cluster(emulator)
    emulator.forbidden |= {"priorityclasses", "runtimeclasses", "nodes", "secrets",
                           "persistentvolumeclaims"}
    findings = preflight(config("kubernetes.scheduling.priority_class_name=batch-low",
                                "kubernetes.sandbox.runtime_class_name=gvisor",
                                "kubernetes.cache.pvc=model-cache"), RUN, emulator.client())
    assert levels(findings, "error") == levels(findings, "warning") == []
    skipped = levels(findings, "skipped")
    assert skipped[:2] == ["cannot check Secret trackb-s3 (forbidden)",
                           "cannot check PersistentVolumeClaim model-cache (forbidden)"]
    assert skipped[2].startswith("cannot check PriorityClass batch-low (forbidden): the "
                                 "launcher's namespaced Role cannot read cluster-scoped")
    assert skipped[3].startswith("cannot check RuntimeClass gvisor (forbidden)")
    assert skipped[4].startswith("cannot list nodes (forbidden)")
    assert len(skipped) == 5


def test_existing_cluster_objects_pass_and_a_missing_runtime_class_is_an_error(emulator):
    cluster(emulator)
    emulator.put("scheduling.k8s.io", "priorityclasses",
                 {"metadata": {"name": "batch-low"}, "value": 10})
    findings = preflight(config("kubernetes.scheduling.priority_class_name=batch-low",
                                "kubernetes.sandbox.runtime_class_name=gvisor"), RUN,
                         emulator.client())
    assert levels(findings, "error") == [
        "RuntimeClass gvisor (kubernetes.sandbox.runtime_class_name) does not exist in the "
        "cluster"]


def test_a_secret_lacking_a_key_pods_read_or_a_missing_pull_secret_is_an_error(emulator):
    emulator.put("", "secrets", {"metadata": {"name": "trackb-s3", "namespace": NAMESPACE},
                                 "data": {"AWS_ACCESS_KEY_ID": "a2V5"}})
    cluster(emulator, secret=False)
    findings = preflight(config("kubernetes.images.pull_secrets=[registry-creds]",
                                "kubernetes.huggingface.token_optional=false"), RUN,
                         emulator.client())
    assert levels(findings, "error") == [
        "Secret trackb-s3 (kubernetes.s3.credentials_secret) has no key AWS_SECRET_ACCESS_KEY",
        f"Secret trackb-hf (kubernetes.huggingface.token_secret) does not exist in namespace "
        f"{NAMESPACE}",
        f"Secret registry-creds (kubernetes.images.pull_secrets) does not exist in namespace "
        f"{NAMESPACE}"]


def test_an_optional_hub_token_secret_is_not_required(emulator):
    cluster(emulator)
    assert preflight(config(), RUN, emulator.client()) == []  # trackb-hf is not there


@pytest.mark.parametrize("modes, warns", [(["ReadWriteOnce"], True),
                                          (["ReadWriteOncePod"], True),
                                          (["ReadWriteMany"], False)])
def test_a_single_node_cache_volume_warns_when_gpu_stages_may_run_at_once(emulator, modes,
                                                                          warns):
    cluster(emulator)
    emulator.put("", "persistentvolumeclaims", {
        "metadata": {"name": "model-cache", "namespace": NAMESPACE},
        "spec": {"accessModes": modes}})
    findings = preflight(config("kubernetes.cache.pvc=model-cache"), RUN, emulator.client())
    assert levels(findings, "error") == []
    warnings = levels(findings, "warning")
    assert bool(warnings) == warns
    if warns:
        assert "Multi-Attach" in warnings[0] and "train and predict-baseline" in warnings[0]


def test_the_cpu_profile_looks_for_no_gpu_node_and_shares_a_single_node_cache(emulator):
    cluster(emulator, gpu_node=False)
    emulator.put("", "persistentvolumeclaims", {
        "metadata": {"name": "model-cache", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadWriteOnce"]}})
    cpu = config("model=tiny", "generate.teacher=reference", "kubernetes.accelerator=cpu",
                 "kubernetes.cache.pvc=model-cache")
    assert preflight(cpu, RUN, emulator.client()) == []
    assert not [call for call in emulator.calls() if call[1] == "nodes"]


def test_the_cli_exits_64_with_one_line_per_problem_and_0_otherwise(emulator, tmp_path,
                                                                    monkeypatch):
    from trackb_core.cli import main

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": emulator.url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "emulator"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    cluster(emulator, gpu_node=False)
    args = ["preflight", "--config", str(GPU), "--run-id", RUN,
            "--set", f"kubernetes.namespace={NAMESPACE}"]

    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines() == [
        "warning: no node matches kubernetes.scheduling.node_selector "
        "(nvidia.com/gpu.product=Tesla-T4): GPU pods stay Pending until one joins (fine for "
        "a pool that autoscales from zero; the launcher waits "
        "kubernetes.budgets.unschedulable_seconds)"]

    refused = CliRunner().invoke(main, [*args, "--set", "kubernetes.cache.pvc=model-cache",
                                        "--set", "kubernetes.sandbox.runtime_class_name=gvisor"])
    assert refused.exit_code == 64, refused.output
    lines = refused.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "error", "warning"]
    assert lines[0].startswith("error: PersistentVolumeClaim model-cache")
    assert lines[1].startswith("error: RuntimeClass gvisor")
    assert refused.stderr.strip() == \
        "trackb: error: preflight found 2 error(s); fix them before run-all"
    created_nothing(emulator)


# -- the model cache: a hub model is downloaded once by warm-cache into the cache PVC ------
HUB = "model=Qwen/Qwen2.5-Coder-1.5B"


def test_a_hub_model_with_a_cache_pvc_passes_since_warm_cache_fills_it(emulator):
    warmed = config(HUB, "kubernetes.cache.pvc=model-cache")
    emulator.provide(warmed)  # a ReadWriteMany PVC, empty: nothing holds the model yet
    assert preflight(warmed, RUN, emulator.client()) == []
    assert "warm-cache" in jobspec.stage_names(warmed)


def test_a_hub_model_without_a_cache_pvc_warns_that_each_pod_downloads_it(emulator):
    hub = config(HUB)
    emulator.provide(hub)
    assert levels(preflight(hub, RUN, emulator.client()), "warning") == [
        "train, predict-baseline, predict-post each download Qwen/Qwen2.5-Coder-1.5B into a "
        "cache that ends with the pod: set kubernetes.cache.pvc (ReadWriteMany; the chart's "
        "cacheVolume creates one) and the run's warm-cache step downloads it once"]


def test_a_read_only_cache_pvc_is_refused_when_warm_cache_must_write_the_model(emulator):
    warmed = config(HUB, "kubernetes.cache.pvc=model-cache")
    emulator.provide(warmed)
    emulator.put("", "persistentvolumeclaims", {
        "metadata": {"name": "model-cache", "namespace": NAMESPACE},
        "spec": {"accessModes": ["ReadOnlyMany"]}})
    assert levels(preflight(warmed, RUN, emulator.client()), "error") == [
        "PersistentVolumeClaim model-cache is ReadOnlyMany, but the warm-cache step writes "
        "Qwen/Qwen2.5-Coder-1.5B into it; use a ReadWriteMany volume"]
    # A model already in the store needs no write: the same claim is fine.
    assert levels(preflight(config("kubernetes.cache.pvc=model-cache"), RUN,
                            emulator.client()), "error") == []
