"""``trackb render`` and the checked-in manifests under k8s/: drift, schemas, policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trackb_core.cli import main
from trackb_core.k8s.jobspec import build_namespace, build_rbac
from trackb_core.k8s.render import HEADER, default_run_id, render, to_yaml
from trackb_core.k8s.settings import KubernetesConfig

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
RENDERED = K8S / "rendered"
# The checked-in renders: (config, run id, folder). `make render` writes exactly these.
RENDERS = [("jobs/configs/demo.yaml", "demo", "demo"),
           ("jobs/configs/cluster-gpu.yaml", "cluster-gpu", "cluster-gpu")]
# Kubernetes JSON schemas the manifests must satisfy (>= 1.30: native sidecars are on
# by default since 1.29, podFailurePolicy is GA in 1.31).
K8S_VERSION = "1.31.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _render_to(tmp_path: Path, config: str, run_id: str, *sets: str) -> Path:
    from trackb_core.config import parse_dotted_overrides

    out = tmp_path / run_id
    render(config, out, run_id=run_id, overrides=parse_dotted_overrides(list(sets)))
    return out


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    # The header records the config path as given; render from the root like `make render`.
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("config,run_id,folder", RENDERS, ids=[r[2] for r in RENDERS])
def test_rendered_matches_trackb_render_byte_for_byte(tmp_path, config, run_id, folder):
    out = _render_to(tmp_path, config, run_id)
    fresh = {p.name: p.read_bytes() for p in sorted(out.glob("*.yaml"))}
    checked_in = {p.name: p.read_bytes() for p in sorted((RENDERED / folder).glob("*.yaml"))}
    assert sorted(fresh) == sorted(checked_in), "run `make render` and commit k8s/rendered/"
    for name in fresh:
        assert fresh[name] == checked_in[name], f"k8s/rendered/{folder}/{name} is stale: " \
                                                "run `make render`"


def test_there_is_one_file_per_stage_plus_the_launcher():
    from trackb_core.stages import STEPS

    # Every step but warm-cache (a hub model with a cache PVC only; the demo's is tiny).
    assert sorted(p.name for p in (RENDERED / "demo").glob("*.yaml")) == sorted(
        [f"{row.folder}.yaml" for row in STEPS if row.when != "model_cache"] +
        ["launcher.yaml"])
    assert not (RENDERED / "cluster-gpu" / "tiny-model.yaml").exists()


def test_render_is_deterministic_and_readable(tmp_path):
    a = _render_to(tmp_path / "a", "jobs/configs/cluster-gpu.yaml", "x")
    b = _render_to(tmp_path / "b", "jobs/configs/cluster-gpu.yaml", "x")
    for path in a.glob("*.yaml"):
        assert path.read_bytes() == (b / path.name).read_bytes()
    text = (a / "generate.yaml").read_text()
    assert text.startswith(HEADER) and "--run-id x" in text.splitlines()[0]
    assert "config.yaml: |\n" in text  # multi-line strings are literal blocks
    for doc in docs(a / "train.yaml"):
        assert list(doc)[:3] == ["apiVersion", "kind", "metadata"]


def _all_manifests(tmp_path: Path) -> list[tuple[str, dict]]:
    found = [(str(p.relative_to(ROOT)), d) for p in sorted(RENDERED.rglob("*.yaml"))
             for d in docs(p)]
    for name in ("namespace.yaml", "rbac.yaml", "secret-template.yaml"):
        found += [(f"k8s/{name}", d) for d in docs(K8S / name)]
    # Variants the checked-in renders do not show: vLLM Deployment, multi-node, PVC.
    variant = _render_to(tmp_path, "jobs/configs/cluster-gpu.yaml", "variant",
                         "kubernetes.vllm.serve=deployment", "kubernetes.distributed.nodes=2",
                         "kubernetes.resources.train.gpus=4", "kubernetes.cache.pvc=hf-cache",
                         "kubernetes.images.pull_secrets=[regcred]")
    found += [(p.name, d) for p in sorted(variant.glob("*.yaml")) for d in docs(p)]
    return found


def test_every_manifest_validates_against_pinned_kubernetes_schemas(tmp_path):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install "
        "-c constraints.txt -e '.[test]')")
    manifests = _all_manifests(tmp_path)
    kinds = {d["kind"] for _, d in manifests}
    assert {"Job", "ConfigMap", "NetworkPolicy", "Service", "Deployment", "Namespace",
            "ServiceAccount", "Role", "RoleBinding", "Secret"} <= kinds
    for where, doc in manifests:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_the_schema_check_catches_mistakes():
    kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                              reason="kubernetes-validate is not installed")
    job = docs(RENDERED / "demo" / "train.yaml")[-1]
    job["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_namespace_and_rbac_files_equal_the_builder():
    k8s = KubernetesConfig()
    assert docs(K8S / "namespace.yaml") == build_namespace(k8s)
    assert docs(K8S / "rbac.yaml") == build_rbac(k8s)


def test_secret_template_holds_placeholders_only():
    secrets = docs(K8S / "secret-template.yaml")
    k8s = KubernetesConfig()
    by_name = {s["metadata"]["name"]: s for s in secrets}
    assert set(by_name[k8s.s3.credentials_secret]["stringData"]) == {
        k8s.s3.access_key_id_key, k8s.s3.secret_access_key_key}
    assert set(by_name[k8s.huggingface.token_secret]["stringData"]) == {k8s.huggingface.token_key}
    for secret in secrets:
        assert "data" not in secret
        for value in secret["stringData"].values():
            assert value.startswith("<REPLACE-") and value.endswith(">")


def test_kind_config_is_a_pinned_multi_node_cluster():
    (cluster,) = docs(K8S / "kind-config.yaml")
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cluster["nodes"]]
    assert roles == ["control-plane", "worker"]
    for node in cluster["nodes"]:
        version = node["image"].split(":v")[1]
        assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 29)  # native sidecars


def test_cli_render_writes_files_and_removes_stale_ones(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-stage.yaml").write_text(HEADER + " (old)\n")
    (out / "mine.yaml").write_text("kind: Keep\n")
    result = CliRunner().invoke(main, ["render", "--config", "jobs/configs/demo.yaml",
                                       "--out", str(out), "--set", "kubernetes.namespace=ml"])
    assert result.exit_code == 0, result.output
    assert (out / "extract.yaml").exists() and not (out / "old-stage.yaml").exists()
    assert (out / "mine.yaml").exists()  # not ours: left alone
    assert str(out / "launcher.yaml") in result.output
    assert docs(out / "extract.yaml")[0]["metadata"]["namespace"] == "ml"
    assert docs(out / "extract.yaml")[0]["metadata"]["labels"]["trackb/run-id"] == "demo"


def test_cli_render_errors_are_one_line_with_exit_64(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kubernetes:\n  vllm:\n    serve: nowhere\n")
    result = CliRunner().invoke(main, ["render", "--config", str(bad), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 64
    assert result.output.startswith("trackb: error: ") and "kubernetes.vllm.serve" in result.output
    result = CliRunner().invoke(main, ["render", "--config", "jobs/configs/demo.yaml",
                                       "--out", str(tmp_path / "o"), "--run-id", "Bad_Id"])
    assert result.exit_code == 64 and "run id" in result.output


def test_default_run_id_comes_from_the_file_name():
    assert default_run_id("jobs/configs/cluster-gpu.yaml") == "cluster-gpu"
    assert default_run_id("My Config_2.yaml") == "my-config-2"


def test_to_yaml_round_trips():
    objects = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
                "data": {"a.yaml": "k: 1\nj: [2]\n", "b": "one line"}}]
    assert list(yaml.safe_load_all(to_yaml(objects, "# h\n"))) == objects


def _checkov() -> str | None:
    candidates = [os.environ.get("TRACKB_CHECKOV", ""),
                  str(ROOT / ".cache" / "checkov-venv" / "bin" / "checkov"),
                  shutil.which("checkov") or ""]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_checkov_finds_no_failed_checks():
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed: run k8s/checkov.sh once (it installs checkov "
                    "into .cache/checkov-venv; its pins clash with trackb's)")
    result = subprocess.run(
        [checkov, "--directory", str(K8S), "--framework", "kubernetes", "secrets",
         "--output", "json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "LOG_LEVEL": "ERROR"})
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"], c.get("file_path"))
              for report in reports if isinstance(report, dict)
              for c in report.get("results", {}).get("failed_checks", [])]
    # Every skip must carry a written reason.
    skipped = [c for report in reports if isinstance(report, dict)
               for c in report.get("results", {}).get("skipped_checks", [])]
    assert sum(r.get("summary", {}).get("resource_count", 0) for r in reports
               if isinstance(r, dict)) > 50
    assert failed == [], failed
    assert skipped, "the rendered Jobs carry reasoned suppressions; none seen"
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason.strip()) > 20, (check["check_id"], check["resource"])
