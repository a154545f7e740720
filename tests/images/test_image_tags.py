"""One version names the images everywhere: trackb_core.__version__.

pyproject's version, the chart's appVersion, the chart's default image tag
(values.yaml's kubernetes.images.tag = ImagesConfig().tag), `make images` / `make push`
and the release workflow all agree, so `helm install` runs the images a release pushed.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest
import yaml

import trackb_core
from trackb_core.k8s.settings import ImagesConfig

from . import ROOT, WORKFLOW

CHART = ROOT / "helm" / "trackb"


def make_image_tag(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "-s", "image-tag", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_pyproject_chart_app_version_and_default_image_tag_are_trackbs_version():
    version = trackb_core.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert pyproject["project"]["version"] == version
    assert chart["appVersion"] == version
    assert ImagesConfig().tag == version
    assert values["kubernetes"]["images"]["tag"] == version


def test_make_tags_images_with_trackbs_version_unless_image_tag_is_given():
    assert make_image_tag() == trackb_core.__version__
    assert make_image_tag("IMAGE_TAG=dev-7") == "dev-7"


def test_make_push_of_the_version_tag_is_refused_off_the_release_commit(tmp_path):
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("make or git is not installed")
    # A dry run (-n) would not run the guard: push for real into a registry that cannot
    # exist; the guard stops it before any docker call.
    described = subprocess.run(["git", "describe", "--tags", "--exact-match", "--dirty"],
                               cwd=ROOT, capture_output=True, text=True)
    if described.stdout.strip() == f"v{trackb_core.__version__}":
        pytest.skip("this checkout is the release commit: its push is allowed")
    result = subprocess.run(["make", "-s", "push", "REGISTRY=invalid.invalid/x"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"not the clean release commit v{trackb_core.__version__}" in result.stderr
    assert "set IMAGE_TAG" in result.stderr


def test_the_release_workflow_publishes_only_a_tag_that_is_trackbs_version():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["publish"]["steps"]
    check = next(i for i, s in enumerate(steps) if "make -s image-tag" in s.get("run", ""))
    build = next(i for i, s in enumerate(steps)
                 if s.get("uses", "").startswith("docker/build-push-action"))
    assert check < build
    assert "helm/trackb/Chart.yaml" in steps[check]["run"]
    meta = next(s for s in steps if s.get("uses", "").startswith("docker/metadata-action"))
    # v<version> becomes the image tag <version>: what the chart asks for.
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"]
