"""The Job-spec builder, one concern per test, on the plain dicts it returns."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from trackb_core.config import build_config, load_yaml, merge, parse_dotted_overrides
from trackb_core.errors import PERMANENT_EXIT_CODES, ConfigError
from trackb_core.k8s import jobspec
from trackb_core.k8s.jobspec import (
    MAIN_CONTAINER,
    RBAC_RULES,
    build_all,
    build_launcher_job,
    build_rbac,
    build_stage,
    build_vllm_service,
    stage_names,
    stage_uri,
)
from trackb_core.k8s.settings import KubernetesConfig, kubernetes_json_schema
from trackb_core.pipeline import PipelineConfig, dependencies, plan
from trackb_core.stages import STEPS, step
from trackb_core.store import open_store

ROOT = Path(__file__).parents[2]
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"
GPU = ROOT / "jobs" / "configs" / "cluster-gpu.yaml"
RUN = "r1"


def config(path: Path = GPU, *sets: str) -> PipelineConfig:
    values = merge(load_yaml(path), parse_dotted_overrides(list(sets)))
    return build_config(PipelineConfig, values)


def kind(objects: list[dict], name: str) -> list[dict]:
    return [o for o in objects if o["kind"] == name]


def job(objects: list[dict]) -> dict:
    (found,) = kind(objects, "Job")
    return found


def pod(objects: list[dict]) -> dict:
    return job(objects)["spec"]["template"]["spec"]


def containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def main_container(objects: list[dict]) -> dict:
    (found,) = [c for c in pod(objects)["containers"] if c["name"] == MAIN_CONTAINER]
    return found


def env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def every_object(cfg: PipelineConfig) -> list[dict]:
    return [o for objects in build_all(cfg, RUN).values() for o in objects]


def pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Job", "Deployment")]


# -- settings --------------------------------------------------------------------------------
def _models(cls: type[BaseModel], seen: set | None = None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return
    seen.add(cls)
    yield cls
    for info in cls.model_fields.values():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _models(annotation, seen)


def test_every_kubernetes_setting_is_described_and_strict():
    models = list(_models(KubernetesConfig))
    assert len(models) >= 12
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        for name, info in model.model_fields.items():
            assert info.description and len(info.description) > 5, f"{model.__name__}.{name}"


def test_unknown_kubernetes_key_is_an_error():
    with pytest.raises(ConfigError, match="kubernetes.vllm.modle"):
        config(GPU, "kubernetes.vllm.modle=x")


def test_permanent_exit_codes_default_to_trackbs():
    assert KubernetesConfig().job.permanent_exit_codes == sorted(PERMANENT_EXIT_CODES)
    with pytest.raises(ValidationError):
        KubernetesConfig.model_validate({"job": {"permanent_exit_codes": [0]}})


def test_t4_defaults_assume_no_platform_labels():
    k8s = KubernetesConfig()
    # nvidia.com/gpu.product exists only with GPU feature discovery: no default selector.
    assert k8s.scheduling.node_selector == {} and k8s.scheduling.gpu_types == []
    assert k8s.scheduling.tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert k8s.vllm.dtype == "half" and k8s.vllm.serve == "sidecar"
    assert k8s.resources.train.gpus == k8s.resources.eval.gpus == k8s.resources.vllm.gpus == 1


def test_settings_are_validated():
    for bad in ({"resources": {"train": {"memory_limit": "lots"}}},
                {"scheduling": {"tolerations": [{"keey": "x"}]}},
                {"s3": {"store": "/local/path"}},
                {"namespace": "Not_A_Name"},
                {"vllm": {"tensor_parallel_size": 2}}):  # resources.vllm.gpus stays 1
        with pytest.raises(ValidationError):
            KubernetesConfig.model_validate(bad)
    ok = KubernetesConfig.model_validate(
        {"vllm": {"tensor_parallel_size": 2}, "resources": {"vllm": {"gpus": 2}}})
    assert ok.resources.vllm.cpu_limit == "4"  # the other defaults survive a partial section


def test_partial_resource_override_keeps_component_defaults():
    cfg = config(GPU, "kubernetes.resources.train.gpus=4")
    train = cfg.kubernetes.resources.train
    assert (train.gpus, train.memory_limit, train.shm_size) == (4, "14Gi", "2Gi")


def test_json_schema_is_the_models():
    schema = kubernetes_json_schema()
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(KubernetesConfig.model_fields)
    assert "description" in schema["properties"]["namespace"]
    assert PipelineConfig.model_fields["kubernetes"].annotation is KubernetesConfig


def test_builder_imports_nothing_from_kubernetes():
    for name in ("jobspec", "settings", "render", "__init__"):
        tree = ast.parse((ROOT / "trackb_core" / "k8s" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "kubernetes" for a in node.names)
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "kubernetes", name


# -- stages and their arguments --------------------------------------------------------------
def test_stage_lists_follow_the_model():
    assert stage_names(config(DEMO)) == [row.folder for row in STEPS
                                         if row.when != "model_cache"]
    assert "tiny-model" not in stage_names(config(GPU))
    with pytest.raises(ConfigError, match="unknown stage"):
        build_stage("tiny-model", config(GPU), RUN)
    with pytest.raises(ConfigError, match="unknown stage"):
        build_stage("nope", config(DEMO), RUN)


def test_invalid_run_id_is_refused():
    for bad in ("UPPER", "-x", "a" * 64, ""):
        with pytest.raises(ConfigError, match="run id"):
            build_stage("extract", config(DEMO), bad)
        with pytest.raises(ConfigError, match="run id"):
            build_launcher_job(config(DEMO), bad)


@pytest.mark.parametrize("path", [DEMO, GPU], ids=lambda p: p.stem)
def test_container_args_are_exactly_what_plan_wires(path, tmp_path):
    """The stage's own CLI, given the Job's args and the ConfigMap, yields plan()'s config."""
    from trackb_core.cli import load_stage_config, main
    from trackb_core.config import options_to_overrides

    cfg = config(path)
    run = open_store("s3://trackb-artifacts").child(f"runs/{RUN}")
    planned = {row.folder: c for row, c in plan(cfg, run)}
    assert list(planned) == stage_names(cfg)
    for stage, wanted in planned.items():
        objects = build_stage(stage, cfg, RUN)
        (config_map,) = kind(objects, "ConfigMap")
        container = main_container(objects)
        module = step(stage).cli.job_module
        assert container["command"] == ["python", "-m", module]
        assert importlib.util.find_spec(module) is not None
        file = tmp_path / f"{stage}.yaml"
        file.write_text(config_map["data"]["config.yaml"])
        args = [str(file) if a == "/etc/trackb/config.yaml" else a for a in container["args"]]
        command_name = step(stage).command
        command = main.commands[command_name]
        ctx = command.make_context(command_name, list(args))
        assert ctx.params["out"] == f"s3://trackb-artifacts/runs/{RUN}/{stage}"
        cls = type(wanted)
        got = load_stage_config(cls, ctx.params["config_file"],
                                options_to_overrides(cls, ctx.params))
        if stage == "generate" and cfg.generate.teacher == "openai":
            assert got.base_url == "http://127.0.0.1:8000/v1"  # the sidecar
            got = got.model_copy(update={"base_url": wanted.base_url})
        assert got == wanted, stage


def test_the_store_is_the_clusters_s3_store():
    cfg = config(DEMO)  # store: . (a laptop folder) -> kubernetes.s3.store
    assert "--out" in main_container(build_stage("train", cfg, RUN))["args"]
    args = main_container(build_stage("train", cfg, RUN))["args"]
    assert args[args.index("--out") + 1] == f"s3://trackb-artifacts/runs/{RUN}/train"
    other = config(DEMO, "store=s3://other/prefix")
    args = main_container(build_stage("compare", other, RUN))["args"]
    assert args[-3:] == ["s3://other/prefix/runs/r1/compare", "s3://other/prefix/runs/r1/eval-baseline",
                         "s3://other/prefix/runs/r1/eval-post"]


@pytest.mark.parametrize("path", [DEMO, GPU], ids=lambda p: p.stem)
def test_declared_dependencies_are_exactly_the_outputs_each_config_reads(path):
    """The step table's wiring, read back from the wired configs: a step depends on the
    steps whose output URIs appear among its config's values, and on nothing else."""
    cfg = config(path)
    configs = jobspec.stage_configs(cfg, RUN)
    outputs = {stage_uri(cfg, RUN, stage): stage for stage in configs}
    for stage, stage_config in configs.items():
        read = {outputs[v] for v in stage_config.model_dump().values()
                if isinstance(v, str) and v in outputs}
        assert set(dependencies(cfg)[stage]) == read, stage


def test_dependencies_come_from_the_wiring():
    deps = dependencies(config(DEMO))
    assert deps["extract"] == [] and deps["generate"] == ["extract"]
    assert deps["train"] == ["build-dataset", "tiny-model"]
    # train and the baseline's evaluation run side by side
    assert "train" not in deps["predict-baseline"] + deps["eval-baseline"]
    assert deps["predict-post"][-1] == "train"
    assert deps["eval-post"] == ["build-dataset", "predict-post"]
    assert deps["compare"] == ["eval-baseline", "eval-post"]


# -- generate: the vLLM sidecar --------------------------------------------------------------
def test_generate_runs_vllm_as_a_native_sidecar():
    cfg = config(GPU)
    spec = pod(build_stage("generate", cfg, RUN))
    vllm, wait = spec["initContainers"]
    assert vllm["name"] == "vllm" and vllm["restartPolicy"] == "Always"
    assert spec["restartPolicy"] == "Never"
    assert vllm["image"].endswith("/trackb-vllm:0.1.0")
    assert "command" not in vllm and "args" not in vllm  # the image's entrypoint serves
    settings = env(vllm)
    assert settings["TRACKB_VLLM_MODEL"] == cfg.kubernetes.vllm.model
    for name, value in (("DTYPE", "half"), ("MAX_MODEL_LEN", "8192"),
                        ("GPU_MEMORY_UTILIZATION", "0.9"), ("TENSOR_PARALLEL_SIZE", "1"),
                        ("HOST", "0.0.0.0"), ("LISTEN_PORT", "8000")):
        assert settings[f"TRACKB_VLLM_{name}"] == value
    extra = pod(build_stage("generate", config(GPU, "kubernetes.vllm.extra_args=[--max-lora-rank, '64']"),
                            RUN))["initContainers"][0]
    assert extra["args"] == ["--max-lora-rank", "64"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_vllm_probes_gate_on_models_with_a_long_startup_budget():
    vllm = pod(build_stage("generate", config(GPU, "kubernetes.vllm.startup_seconds=2400"),
                           RUN))["initContainers"][0]
    startup = vllm["startupProbe"]
    assert startup["httpGet"]["path"] == "/v1/models"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2400
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    # A liveness probe only starts after the startup probe passed: no kill mid-download.
    assert vllm["livenessProbe"]["httpGet"]["path"] == "/health"


def test_vllm_gets_shm_hf_token_and_cache():
    spec = pod(build_stage("generate", config(GPU), RUN))
    vllm = spec["initContainers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in vllm["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert env(vllm)["HF_TOKEN"] == {"secretKeyRef": {"name": "trackb-hf", "key": "HF_TOKEN",
                                                       "optional": True}}
    assert env(vllm)["HF_HOME"].startswith("/cache") and mounts["/cache"] == "cache"
    assert "emptyDir" in volumes["cache"]
    with_pvc = pod(build_stage("generate", config(GPU, "kubernetes.cache.pvc=models"), RUN))
    cache = {v["name"]: v for v in with_pvc["volumes"]}["cache"]
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "models"}}


def test_vllm_pod_lands_on_gpu_nodes():
    spec = pod(build_stage("generate", config(GPU), RUN))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "Tesla-T4"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_client_waits_for_models_then_calls_the_sidecar():
    objects = build_stage("generate", config(GPU), RUN)
    wait = pod(objects)["initContainers"][1]
    assert wait["name"] == jobspec.WAIT_CONTAINER
    assert env(wait)["TEACHER_MODELS_URL"] == "http://127.0.0.1:8000/v1/models"
    assert "urlopen" in wait["command"][-1] and "sys.exit(75)" in wait["command"][-1]
    compile(wait["command"][-1], "wait", "exec")
    client_config = yaml.safe_load(kind(objects, "ConfigMap")[0]["data"]["config.yaml"])
    assert client_config["base_url"] == "http://127.0.0.1:8000/v1"
    assert "nvidia.com/gpu" not in main_container(objects)["resources"]["limits"]


def test_deployment_mode_builds_a_server_the_client_calls():
    cfg = config(GPU, "kubernetes.vllm.serve=deployment")
    objects = build_stage("generate", cfg, RUN)
    spec = pod(objects)
    assert [c["name"] for c in spec["initContainers"]] == [jobspec.WAIT_CONTAINER]
    server = build_vllm_service(cfg, RUN)
    deployment, service = kind(server, "Deployment")[0], kind(server, "Service")[0]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    host = f"{service['metadata']['name']}.{cfg.kubernetes.namespace}.svc"
    url = yaml.safe_load(kind(objects, "ConfigMap")[0]["data"]["config.yaml"])["base_url"]
    assert url == f"http://{host}:8000/v1"
    vllm = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "restartPolicy" not in vllm and vllm["startupProbe"]["httpGet"]["path"] == "/v1/models"
    policy = kind(server, "NetworkPolicy")[0]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "trackb/stage"] == "generate"
    assert "vllm-server" in build_all(cfg, RUN)


def test_reference_teacher_needs_no_server_and_no_gpu():
    objects = build_stage("generate", config(DEMO), RUN)
    spec = pod(objects)
    assert "initContainers" not in spec and "nodeSelector" not in spec
    assert "nvidia.com/gpu" not in str(objects)


def test_cpu_profile_cannot_create_vllm():
    with pytest.raises(ConfigError, match="CPU profile cannot run vLLM"):
        build_stage("generate", config(DEMO, "generate.teacher=openai"), RUN)
    external = config(DEMO, "generate.teacher=openai", "kubernetes.vllm.serve=external",
                      "generate.base_url=http://teacher.example:8000/v1")
    url = yaml.safe_load(kind(build_stage("generate", external, RUN), "ConfigMap")[0]["data"][
        "config.yaml"])["base_url"]
    assert url == "http://teacher.example:8000/v1"


# -- train / eval ----------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "predict-baseline", "predict-post"])
def test_train_and_eval_are_scheduled_on_t4s_from_config(stage):
    # (demo.yaml has no node_selector to merge into: the override replaces the default)
    cfg = config(DEMO, "kubernetes.accelerator=gpu",
                 "kubernetes.scheduling.node_selector={cloud.google.com/gke-accelerator: "
                 "nvidia-tesla-t4}")
    objects = build_stage(stage, cfg, RUN)
    spec = pod(objects)
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert spec["tolerations"] == cfg.kubernetes.scheduling.tolerations
    main = main_container(objects)
    # eval's generation runs on vLLM's offline engine: the image holding trackb and vLLM.
    image = "trackb-trainer" if stage == "train" else "trackb-vllm"
    assert main["image"].endswith(f"/{image}:0.1.0")
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert "/dev/shm" in mounts


@pytest.mark.parametrize("stage", [row.folder for row in STEPS if row.when != "model_cache"])
def test_job_policy(stage):
    cfg = config(DEMO, "kubernetes.job.backoff_limit=3",
                 "kubernetes.job.ttl_seconds_after_finished=600",
                 "kubernetes.job.deadlines.train=7200")
    spec = job(build_stage(stage, cfg, RUN))["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 3
    assert spec["ttlSecondsAfterFinished"] == 600
    key = step(stage).resources
    assert spec["activeDeadlineSeconds"] == getattr(cfg.kubernetes.job.deadlines, key)
    if stage == "train":
        assert spec["activeDeadlineSeconds"] == 7200


def test_pod_failure_policy():
    rules = job(build_stage("train", config(GPU), RUN))["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"][0]["onExitCodes"]
    assert fail == {"containerName": MAIN_CONTAINER, "operator": "In",
                    "values": sorted(PERMANENT_EXIT_CODES)}
    ignore = [r for r in rules if r["action"] == "Ignore"][0]
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def test_every_container_falls_back_to_logs_for_its_termination_message():
    deployment = config(GPU, "kubernetes.vllm.serve=deployment")
    for objects in (every_object(config(DEMO)), every_object(config(GPU)),
                    every_object(deployment) + build_vllm_service(deployment, RUN)):
        for spec in pod_specs(objects):
            for c in containers(spec):
                assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_several_gpus_on_one_node_run_torchrun():
    main = main_container(build_stage("train", config(GPU, "kubernetes.resources.train.gpus=4"),
                                      RUN))
    assert main["command"] == ["torchrun"]
    assert main["args"][:3] == ["--standalone", "--nproc-per-node=4", "-m"]
    assert main["args"][3] == "jobs.train"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "4"
    one = main_container(build_stage("train", config(GPU), RUN))
    assert one["command"] == ["python", "-m", "jobs.train"]


def test_several_nodes_make_an_indexed_job_with_a_headless_service():
    cfg = config(GPU, "kubernetes.distributed.nodes=3", "kubernetes.resources.train.gpus=2")
    objects = build_stage("train", cfg, RUN)
    spec = job(objects)["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    (service,) = kind(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_spec = spec["template"]["spec"]
    assert pod_spec["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    main = main_container(objects)
    assert main["command"] == ["torchrun"]
    master = f"--master-addr={job(objects)['metadata']['name']}-0.{service['metadata']['name']}"
    assert {"--nnodes=3", "--nproc-per-node=2", "--node-rank=$(NODE_RANK)", master,
            "--master-port=29500"} <= set(main["args"])
    assert "job-completion-index" in env(main)["NODE_RANK"]["fieldRef"]["fieldPath"]
    policy = kind(objects, "NetworkPolicy")[0]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == \
        service["spec"]["selector"]
    # Eval is one process per pod: nodes apply to training only.
    assert "completionMode" not in job(build_stage("eval-post", cfg, RUN))["spec"]


def test_cpu_profile_uses_the_cpu_image_and_no_gpus():
    objects = every_object(config(DEMO))
    assert "nvidia.com/gpu" not in str(objects)
    for spec in pod_specs(objects):
        assert "tolerations" not in spec and "nodeSelector" not in spec
        for c in containers(spec):
            assert c["image"] == "ghcr.io/trackb/trackb-cpu:0.1.0"
    forced = config(DEMO, "kubernetes.accelerator=gpu")
    assert main_container(build_stage("train", forced, RUN))["image"].endswith("trainer:0.1.0")
    assert main_container(build_stage("tiny-model", forced, RUN))["image"].endswith("cpu:0.1.0")


def test_image_references():
    cfg = config(DEMO, "kubernetes.images.registry=", "kubernetes.images.tag=dev",
                 "kubernetes.images.cpu=reg.example/cpu@sha256:" + "a" * 64,
                 "kubernetes.images.pull_policy=Always",
                 "kubernetes.images.pull_secrets=[regcred]")
    spec = pod(build_stage("extract", cfg, RUN))
    assert spec["containers"][0]["image"] == "reg.example/cpu@sha256:" + "a" * 64
    assert spec["containers"][0]["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    plain = config(DEMO, "kubernetes.images.registry=", "kubernetes.images.tag=dev")
    assert pod(build_stage("extract", plain, RUN))["containers"][0]["image"] == "trackb-cpu:dev"


# -- everything --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [DEMO, GPU], ids=lambda p: p.stem)
def test_every_pod_and_container_is_locked_down(path):
    cfg = config(path, "kubernetes.vllm.serve=deployment") if path == GPU else config(path)
    objects = every_object(cfg) + (build_vllm_service(cfg, RUN) if path == GPU else [])
    specs = pod_specs(objects)
    assert len(specs) >= 8
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["runAsUser"] > 0
        # No recursive chown of a big cache PVC at every start.
        assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        mounts_tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert "tmp" in mounts_tmp
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["privileged"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert sc["readOnlyRootFilesystem"] is True
            if "volumeMounts" in c:
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
            else:
                assert c["name"] == jobspec.WAIT_CONTAINER  # writes nothing


def test_read_only_root_filesystem_is_a_switch():
    cfg = config(DEMO, "kubernetes.security.read_only_root_filesystem=false")
    for spec in pod_specs(every_object(cfg)):
        for c in containers(spec):
            assert c["securityContext"]["readOnlyRootFilesystem"] is False


def test_only_the_launcher_gets_an_api_token():
    for stage, objects in build_all(config(GPU), RUN).items():
        spec = pod(objects)
        if stage == "launcher":
            assert spec["automountServiceAccountToken"] is True
            assert spec["serviceAccountName"] == "trackb-launcher"
        else:
            assert spec["automountServiceAccountToken"] is False
            assert "serviceAccountName" not in spec
    spec = pod(build_stage("train", config(GPU, "kubernetes.job_service_account=s3-writer"),
                           RUN))
    assert spec["serviceAccountName"] == "s3-writer" and not spec["automountServiceAccountToken"]


def test_every_container_has_requests_and_limits():
    for cfg in (config(DEMO), config(GPU)):
        for spec in pod_specs(every_object(cfg)):
            for c in containers(spec):
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
    cfg = config(DEMO, "kubernetes.resources.extract.memory_limit=3Gi")
    limits = main_container(build_stage("extract", cfg, RUN))["resources"]["limits"]
    assert limits["memory"] == "3Gi"


def test_every_object_carries_the_labels():
    wanted = {"app.kubernetes.io/name", "app.kubernetes.io/instance",
              "app.kubernetes.io/component", "app.kubernetes.io/part-of",
              "app.kubernetes.io/version", "app.kubernetes.io/managed-by"}
    for stage, objects in build_all(config(GPU), RUN).items():
        for obj in objects:
            labels = obj["metadata"]["labels"]
            assert wanted <= set(labels)
            assert labels["trackb/run-id"] == RUN and labels["trackb/stage"] == stage
            assert labels["app.kubernetes.io/component"] == stage
            assert obj["metadata"]["namespace"] == "trackb"
        assert job(objects)["spec"]["template"]["metadata"]["labels"]["trackb/stage"] == stage


def test_s3_credentials_only_through_secret_key_refs():
    secretish = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN")
    for spec in pod_specs(every_object(config(GPU))):
        for c in containers(spec):
            for item in c.get("env", []):
                if item["name"] in secretish:
                    assert "value" not in item and "secretKeyRef" in item["valueFrom"]
    main = main_container(build_stage("extract", config(GPU), RUN))
    assert env(main)["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {
        "name": "trackb-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env(main)["TRACKB_S3_ENDPOINT_URL"] == "http://minio.minio.svc.cluster.local:9000"
    irsa = main_container(build_stage("extract", config(GPU, "kubernetes.s3.credentials_secret="),
                                      RUN))
    assert "AWS_ACCESS_KEY_ID" not in env(irsa)


@pytest.mark.parametrize("stage", ["build-dataset", "eval-baseline", "eval-post"])
def test_code_running_stages_reach_only_dns_and_the_object_store(stage):
    objects = build_stage(stage, config(GPU), RUN)
    (policy,) = kind(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"trackb/run-id": RUN, "trackb/stage": stage}
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in spec
    dns, store = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert store["to"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "minio"}}, "podSelector": {"matchLabels": {}}}]
    assert store["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert env(main_container(objects))["HF_HUB_OFFLINE"] == "1"
    external = config(GPU, "kubernetes.network.store_namespace=",
                      "kubernetes.network.store_cidrs=[52.216.0.0/15]",
                      "kubernetes.network.store_ports=[443]")
    (policy,) = kind(build_stage(stage, external, RUN), "NetworkPolicy")
    assert policy["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "52.216.0.0/15"}}]


def test_other_stages_refuse_ingress_but_keep_egress():
    (policy,) = kind(build_stage("extract", config(GPU), RUN), "NetworkPolicy")
    assert "ingress" not in policy["spec"] and policy["spec"]["egress"] == [{}]
    off = build_stage("eval-post", config(GPU, "kubernetes.network.enabled=false"), RUN)
    assert not kind(off, "NetworkPolicy")
    assert "HF_HUB_OFFLINE" not in env(main_container(off))


def test_eval_network_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="store_namespace or store_cidrs"):
        build_stage("eval-post", config(GPU, "kubernetes.network.store_namespace="), RUN)
    # Generation (a GPU pod, no model-written code) may fetch a hub model; scoring (where
    # model-written code runs) never loads a model, so its egress stays locked.
    hub = config(GPU, "model=Qwen/Qwen2.5-Coder-1.5B")
    predict = next(o for o in build_stage("predict-baseline", hub, RUN)
                   if o["kind"] == "NetworkPolicy")
    assert predict["spec"]["egress"] == [{}]
    scoring = next(o for o in build_stage("eval-baseline", hub, RUN)
                   if o["kind"] == "NetworkPolicy")
    assert scoring["spec"]["egress"] != [{}]


@pytest.mark.parametrize("stage", ["build-dataset", "eval-baseline", "eval-post"])
def test_code_running_pods_have_no_gpu_and_may_take_gvisor_and_a_seccomp_profile(stage):
    plain = build_stage(stage, config(GPU), RUN)
    assert "runtimeClassName" not in pod(plain)
    assert "nvidia.com/gpu" not in main_container(plain)["resources"]["limits"]
    assert main_container(plain)["securityContext"]["seccompProfile"] == \
        {"type": "RuntimeDefault"}
    sandboxed = build_stage(stage, config(
        GPU, "kubernetes.sandbox.runtime_class_name=gvisor", "kubernetes.sandbox.gvisor=true",
        "kubernetes.sandbox.seccomp_localhost_profile=profiles/trackb-sandbox.json"), RUN)
    assert pod(sandboxed)["runtimeClassName"] == "gvisor"
    assert env(main_container(sandboxed))["TRACKB_SANDBOX_RUNTIME"] == "gvisor"
    assert main_container(sandboxed)["securityContext"]["seccompProfile"] == {
        "type": "Localhost", "localhostProfile": "profiles/trackb-sandbox.json"}
    # Pods that run no model-written code keep the cluster's runtime.
    other = build_stage("predict-baseline", config(
        GPU, "kubernetes.sandbox.runtime_class_name=gvisor"), RUN)
    assert "runtimeClassName" not in pod(other)


def test_launcher_runs_run_all_on_the_k8s_backend():
    cfg = config(DEMO)
    objects = build_launcher_job(cfg, "demo")
    main = main_container(objects)
    assert main["command"] == ["python", "-m", "jobs.run_all"]
    assert main["args"] == ["--config", "/etc/trackb/pipeline.yaml", "--run-id", "demo",
                            "--backend", "k8s"]
    text = kind(objects, "ConfigMap")[0]["data"]["pipeline.yaml"]
    reloaded = build_config(PipelineConfig, yaml.safe_load(text))
    assert reloaded == cfg.model_copy(update={"run_id": "demo",
                                              "store": "s3://trackb-artifacts"})
    assert "trackb-s3" in str(env(main)["AWS_ACCESS_KEY_ID"])


def test_the_launcher_pod_knows_its_own_job_from_the_job_controllers_pod_labels():
    # The launcher's Job owns the vLLM server it creates (launcher._server_owner).
    variables = env(main_container(build_launcher_job(config(DEMO), "demo")))
    assert variables["TRACKB_LAUNCHER_JOB"] == {"fieldRef": {
        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert variables["TRACKB_LAUNCHER_JOB_UID"] == {"fieldRef": {
        "fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}}


def test_an_owner_reference_never_blocks_the_owners_deletion():
    from trackb_core.k8s.jobspec import owner_reference

    assert owner_reference("batch/v1", "Job", "j", "u-1") == {
        "apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u-1",
        "controller": True, "blockOwnerDeletion": False}


def test_rendered_objects_carry_no_owner_references():
    # Uids exist only on a cluster: the launcher adds ownerReferences as it creates.
    for objects in build_all(config(GPU), RUN).values():
        assert all("ownerReferences" not in o["metadata"] for o in objects)


def test_checkov_suppressions_appear_only_where_they_apply():
    annotations = job(build_stage("extract", config(DEMO), RUN))["metadata"]["annotations"]
    reasons = dict(v.split("=", 1) for v in annotations.values())
    assert set(reasons) == {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}
    assert all(len(r) > 30 for r in reasons.values())
    strict = config(DEMO, "kubernetes.images.pull_policy=Always",
                    "kubernetes.s3.credentials_secret=")
    annotations = job(build_stage("extract", strict, RUN))["metadata"]["annotations"]
    assert [v.split("=")[0] for v in annotations.values()] == ["CKV_K8S_43"]
    launcher = job(build_launcher_job(config(DEMO), RUN))["metadata"]["annotations"]
    assert any(v.startswith("CKV_K8S_38=") for v in launcher.values())


def test_long_run_ids_give_short_unique_names():
    long_a, long_b = "a" * 60 + "-x1", "a" * 60 + "-x2"
    names = set()
    for run_id in (long_a, long_b):
        for objects in build_all(config(DEMO), run_id).values():
            for obj in objects:
                assert len(obj["metadata"]["name"]) <= jobspec.NAME_MAX
                names.add(obj["metadata"]["name"])
                assert len(obj["metadata"]["labels"]["app.kubernetes.io/instance"]) <= 63
    assert len(names) == 2 * sum(len(o) for o in build_all(config(DEMO), long_a).values())


def test_rbac_is_least_privilege():
    role = kind(build_rbac(KubernetesConfig()), "Role")[0]
    secrets = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["trackb-s3"],
               "verbs": ["get"]}
    assert [r for r in role["rules"] if r != secrets] == [dict(r) for r in RBAC_RULES]
    assert secrets in role["rules"]
    for rule in role["rules"]:
        assert "*" not in str(rule)
        assert not {"deletecollection", "escalate", "bind"} & set(rule["verbs"])
        # Changing objects in place: the run's own Lease (renewals), and the ownerReferences
        # of what the launcher created (a stage's objects owned by its Job, the vLLM
        # server by its launcher). Never a Job, a pod or a Secret; never a full update.
        if {"update", "patch"} & set(rule["verbs"]):
            assert rule["resources"][0] in ("leases", "configmaps", "services",
                                            "networkpolicies", "deployments"), rule
            assert "update" not in rule["verbs"], rule
    created = {o["kind"] for o in every_object(config(GPU, "kubernetes.distributed.nodes=2",
                                                      "kubernetes.resources.train.gpus=2"))}
    created |= {o["kind"] for o in build_vllm_service(config(GPU), RUN)}
    resource = {"Job": "jobs", "ConfigMap": "configmaps", "Service": "services",
                "Deployment": "deployments", "NetworkPolicy": "networkpolicies"}
    for kind_name in created:
        rule = [r for r in role["rules"] if resource[kind_name] in r["resources"]]
        assert rule and "create" in rule[0]["verbs"] and "delete" in rule[0]["verbs"], kind_name


def test_the_role_reads_only_the_secrets_pods_need_and_none_when_there_are_none():
    k8s = KubernetesConfig.model_validate({
        "s3": {"credentials_secret": "keys"}, "images": {"pull_secrets": ["pull", "keys"]},
        "huggingface": {"token_secret": "hub", "token_optional": False}})
    assert jobspec.secret_names(k8s) == ["keys", "hub", "pull"]
    (rule,) = [r for r in jobspec.role_rules(k8s) if "secrets" in r["resources"]]
    assert rule["resourceNames"] == ["keys", "hub", "pull"]
    # An optional hub token is not checked; with no names at all there is no rule, since
    # an empty resourceNames would grant every Secret.
    none = KubernetesConfig.model_validate({"s3": {"credentials_secret": None}})
    assert jobspec.secret_names(none) == []
    assert not [r for r in jobspec.role_rules(none) if "secrets" in r["resources"]]


@pytest.mark.parametrize("model, pvc, ok", [
    ("s3://bucket/models/qwen", None, True),
    ("Qwen/Qwen2.5-Coder-1.5B", None, True),  # generation pods reach the hub
    ("/cache/models/qwen", "model-cache", True),
    ("/opt/models/qwen", None, True),  # taken on trust: a custom image may carry it
    ("/cache/models/qwen", None, False),  # an emptyDir cache starts empty
    ("./models/qwen", "model-cache", False),
    ("~/models/qwen", None, False),
    ("file:///models/qwen", None, False),
])
def test_a_model_is_found_only_in_the_store_the_hub_or_on_the_cache_pvc(model, pvc, ok):
    sets = [f"model={model}"] + ([f"kubernetes.cache.pvc={pvc}"] if pvc else [])
    cfg = config(GPU, *sets)
    if ok:
        build_stage("train", cfg, RUN)
        return
    with pytest.raises(ConfigError, match="train pods do not see this machine's files, so "
                                          "the model must be in the store or on a cache PVC"):
        build_stage("train", cfg, RUN)


# -- warm-cache: a hub model downloaded once into the cache PVC ----------------------------
def warmed() -> PipelineConfig:
    return config(GPU, "model=Qwen/Qwen2.5-Coder-1.5B", "kubernetes.cache.pvc=model-cache")


def test_warm_cache_downloads_the_hub_model_onto_the_cache_pvc_with_the_hub_token():
    objects = build_stage("warm-cache", warmed(), RUN)
    main = main_container(objects)
    assert main["command"] == ["python", "-m", "jobs.warm_cache"]
    stage_config = yaml.safe_load(kind(objects, "ConfigMap")[0]["data"]["config.yaml"])
    assert stage_config["model"] == "Qwen/Qwen2.5-Coder-1.5B"
    variables = env(main)
    assert variables["HF_HOME"] == "/cache/huggingface"
    assert "HF_TOKEN" in variables and "HF_HUB_OFFLINE" not in variables
    assert "nvidia.com/gpu" not in str(main["resources"])  # the cpu image, no GPU
    volumes = {v["name"]: v for v in pod(objects)["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "model-cache"
    policy = kind(objects, "NetworkPolicy")
    assert policy and policy[0]["spec"]["egress"] == [{}]  # it reaches the hub


@pytest.mark.parametrize("stage", ["train", "predict-baseline", "predict-post"])
def test_steps_loading_a_warmed_model_read_it_offline_from_the_cache(stage):
    assert env(main_container(build_stage(stage, warmed(), RUN)))["HF_HUB_OFFLINE"] == "1"
    unwarmed = config(GPU, "model=Qwen/Qwen2.5-Coder-1.5B")
    assert "HF_HUB_OFFLINE" not in env(main_container(build_stage(stage, unwarmed, RUN)))
