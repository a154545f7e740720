"""Many corpora in one run: two PyPI packages (wheels in a local find-links folder, no
network) and a folder make one dataset; provenance, import roots and split groups hold
across corpora."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from trackb_core import corpus as corpus_mod
from trackb_core import dataset, extract, generate, testrun
from trackb_core.config import build_config, declared_inputs
from trackb_core.corpus import (
    CORPORA_MARKER,
    corpus_files,
    corpus_sources,
    import_root,
    resolve_corpora,
    unpack_snapshot,
)
from trackb_core.dataset import DatasetConfig
from trackb_core.errors import ConfigError
from trackb_core.extract import ExtractConfig
from trackb_core.generate import GenerateConfig
from trackb_core.pipeline import PipelineConfig
from trackb_core.store import LocalStore

# vendored into both packages: one function, two corpora (beta's copy has its own
# docstring, so exact-copy dedup keeps both rows and only the split grouping joins them)
VENDORED = '''def clamp_between(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''
VENDORED_COPY = VENDORED.replace("Clamp value into [low, high].",
                                 "Vendored from alphapkg 1.0: keep value within its bounds.")


def _module(package: str, stem: str, count: int) -> str:
    """``count`` distinct small functions, each of enough lines to be kept."""
    parts = []
    for i in range(count):
        parts.append(f'''def {stem}_{i}(items, limit={i + 2}):
    """Sum the items of {package} below a limit ({i})."""
    total = {i}
    for item in items:
        if item < limit:
            total += item * {i + 1}
    return total
''')
    return "\n\n".join(parts)


def _wheel(name: str, version: str, members: dict[str, str], license_name: str) -> bytes:
    dist = f"{name}-{version}.dist-info"
    members = {**members,
               f"{dist}/METADATA": f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n"
                                   f"License-Expression: {license_name}\n",
               f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                "Tag: py3-none-any\n",
               f"{dist}/RECORD": ""}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for member, text in members.items():
            zf.writestr(member, text)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def three_corpora(tmp_path_factory):
    """``(corpus setting, root)``: pypi:alphapkg==1.0 (MIT) and pypi:betapkg==2.0
    (Apache-2.0) from a local find-links folder, and a folder corpus ``gamma`` with a
    license given in the setting and its tests left out by a glob."""
    root = tmp_path_factory.mktemp("corpora")
    links = root / "links"
    links.mkdir()
    (links / "alphapkg-1.0-py3-none-any.whl").write_bytes(_wheel("alphapkg", "1.0", {
        "alphapkg/__init__.py": "",
        "alphapkg/util.py": VENDORED + "\n\n" + _module("alpha", "alpha_sum", 12),
    }, "MIT"))
    (links / "betapkg-2.0-py3-none-any.whl").write_bytes(_wheel("betapkg", "2.0", {
        "betapkg/__init__.py": "",
        "betapkg/_vendor/__init__.py": "",
        "betapkg/_vendor/clamp.py": VENDORED_COPY,
        "betapkg/helpers.py": "OFFSET = 3\n",
        # imports a sibling module of its own package: runs only from betapkg's root
        "betapkg/core.py": "from betapkg.helpers import OFFSET\n\n\n"
                           + _module("beta", "beta_sum", 12) + "\n\n"
                           "def shifted(value):\n    \"\"\"value plus the offset.\"\"\"\n"
                           "    result = value\n    result += OFFSET\n    return result\n",
    }, "Apache-2.0"))
    gamma = root / "gamma"
    (gamma / "gamma").mkdir(parents=True)
    (gamma / "gamma" / "__init__.py").write_text("")
    (gamma / "gamma" / "calc.py").write_text(_module("gamma", "gamma_sum", 12))
    (gamma / "tests").mkdir()
    (gamma / "tests" / "test_calc.py").write_text(_module("gamma", "test_sum", 3))
    os.environ.update({"TRACKB_CACHE": str(root / "cache"), "PIP_NO_INDEX": "1",
                       "PIP_FIND_LINKS": str(links), "PIP_CONFIG_FILE": os.devnull})
    setting = ["pypi:alphapkg==1.0", "pypi:betapkg==2.0",
               {"source": str(gamma), "license": "BSD-3-Clause", "exclude": ["tests/**"]}]
    yield setting, root
    for name in ("TRACKB_CACHE", "PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        os.environ.pop(name, None)


@pytest.fixture(scope="module")
def three_corpus_run(three_corpora):
    """extract -> generate (reference teacher) -> build-dataset over the three corpora."""
    setting, root = three_corpora
    store = LocalStore(root / "run")
    manifests = {
        "extract": extract.run(build_config(ExtractConfig, {"corpus": setting}),
                               store.child("extract")),
        "generate": generate.run(GenerateConfig(tasks=store.child("extract").uri),
                                 store.child("generate")),
        # near-duplicate removal only for near-identical texts: the two copies stay
        "dataset": dataset.run(DatasetConfig(responses=store.child("generate").uri,
                                             test_ratio=0.3, near_dup_threshold=0.99),
                               store.child("build-dataset")),
    }
    return store, manifests


def _rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_a_run_over_three_corpora_makes_one_dataset_whose_card_lists_each_corpus(
        three_corpus_run):
    store, manifests = three_corpus_run
    card = (store.root / "build-dataset" / "README.md").read_text()
    corpora = manifests["extract"]["inputs"]["corpus"]["corpora"]
    assert [c["key"] for c in corpora] == ["alphapkg", "betapkg", "gamma"]
    assert [c["version"] for c in corpora[:2]] == ["1.0", "2.0"]
    assert [c["license"] for c in corpora] == ["MIT", "Apache-2.0", "BSD-3-Clause"]
    for entry in corpora:
        assert f"`{entry['key']}`" in card and entry["sha256"] in card
        assert f"license {entry['license']}" in card
    assert "version 1.0" in card and "version 2.0" in card and "exclude tests/**" in card
    rows = _rows(store.root / "build-dataset", "train.jsonl") + \
        _rows(store.root / "build-dataset", "test.jsonl")
    assert {r["source_file"].split("/")[0] for r in rows} == {"alphapkg", "betapkg", "gamma"}
    assert not any("test_sum" in r["source_function"] for r in rows)  # excluded by glob
    recorded = manifests["extract"]["corpus"]
    assert recorded["sha256"] == manifests["extract"]["inputs"]["corpus"]["sha256"]
    assert [c["files"] for c in recorded["corpora"]] == [2, 5, 2]
    assert sum(c["functions"] for c in recorded["corpora"]) == \
        manifests["extract"]["counts"]["functions"]


def test_a_function_vendored_in_two_corpora_lands_on_one_side_of_the_split(three_corpus_run):
    store, manifests = three_corpus_run
    functions = _rows(store.root / "extract", "functions.jsonl")
    copies = [f for f in functions if f["name"] == "clamp_between"]
    assert sorted(f["file"] for f in copies) == ["alphapkg/alphapkg/util.py",
                                                  "betapkg/betapkg/_vendor/clamp.py"]
    assert len({f["id"] for f in functions}) == len(functions)  # ids unique across corpora
    sides: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for row in _rows(store.root / "build-dataset", f"{split}.jsonl"):
            if "clamp_between" in row["source_function"]:
                sides.setdefault(row["source_file"], set()).add(split)
    assert set(sides) == {"alphapkg/alphapkg/util.py", "betapkg/betapkg/_vendor/clamp.py"}
    assert len(set().union(*sides.values())) == 1, sides  # both copies on one side
    responses = _rows(store.root / "generate", "responses.jsonl")
    groups, joins = dataset.split_groups(responses)
    assert len({groups[r["id"]] for r in responses if r["function_name"] == "clamp_between"}) == 1
    assert joins["functions_sharing_a_body"] >= 2
    assert manifests["dataset"]["counts"]["test_rows"] > 0


def test_each_corpus_imports_from_its_own_folder_of_the_snapshot(three_corpus_run):
    store, manifests = three_corpus_run
    snapshot = manifests["extract"]["outputs"]["corpus.tar.gz"]
    folder = unpack_snapshot(store.root / "extract" / "corpus.tar.gz", snapshot["sha256"])
    assert json.loads((folder / CORPORA_MARKER).read_text())["corpora"] == [
        "alphapkg", "betapkg", "gamma"]
    assert import_root(folder, "betapkg/betapkg/core.py") == (folder / "betapkg",
                                                               "betapkg/core.py")
    item = {"source_file": "betapkg/betapkg/core.py", "qualname": "shifted"}
    tests = "from betapkg.core import shifted\n\n\ndef test_shift():\n    assert shifted(1) == 4\n"
    outcome = testrun.run_against(tests, item, folder, testrun.Budget())
    assert not isinstance(outcome, str) and outcome["outcome"] == "ran", outcome
    assert [kind for _, kind, _ in outcome["results"]] == ["passed"]


def test_a_corpus_list_hashes_every_corpus_and_its_globs(three_corpora):
    setting, _ = three_corpora
    config = build_config(ExtractConfig, {"corpus": setting})
    (_, uri, kind, _), = [d for d in declared_inputs(config) if d[0] == "corpus"]
    from trackb_core.stage import hash_input

    first = hash_input(uri, kind)
    narrowed = build_config(ExtractConfig, {"corpus": [*setting[:2], {
        **setting[2], "exclude": ["tests/**", "gamma/__init__.py"]}]})
    (_, uri2, _, _), = [d for d in declared_inputs(narrowed) if d[0] == "corpus"]
    assert hash_input(uri2, kind)["sha256"] != first["sha256"]
    assert hash_input(uri, kind)["sha256"] == first["sha256"]


def test_one_corpus_string_stays_valid_everywhere(stdlib_corpus):
    assert ExtractConfig(corpus="pypi:verl==0.9.1").corpus == "pypi:verl==0.9.1"
    # --corpus on the command line arrives as a one-item list
    assert build_config(ExtractConfig, {"corpus": [str(stdlib_corpus)]}).corpus == \
        str(stdlib_corpus)
    assert PipelineConfig(corpus="pypi:verl==0.9.1").corpus == "pypi:verl==0.9.1"
    (only,) = resolve_corpora(str(stdlib_corpus))
    assert only.path == stdlib_corpus and only.key == stdlib_corpus.name


def test_two_corpora_of_one_name_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="two corpora are named"):
        corpus_sources(["pypi:a==1", "pypi:a==2"])
    with pytest.raises(ValueError, match="two corpora are named"):
        PipelineConfig(corpus=["pypi:a==1", {"source": "pypi:b==1", "name": "a"}])


def test_include_and_exclude_globs_choose_a_corpus_files(tmp_path):
    for rel in ("pkg/a.py", "pkg/sub/b.py", "tests/test_a.py", "pkg/tests/test_b.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")

    def chosen(include=(), exclude=()):
        return [p.relative_to(tmp_path).as_posix()
                for p in corpus_files(tmp_path, include, exclude)]

    assert chosen(exclude=["tests/**"]) == ["pkg/a.py", "pkg/sub/b.py", "pkg/tests/test_b.py"]
    assert chosen(exclude=["**/tests/**"]) == ["pkg/a.py", "pkg/sub/b.py"]
    assert chosen(include=["pkg"], exclude=["pkg/sub"]) == ["pkg/a.py", "pkg/tests/test_b.py"]
    assert chosen(include=["pkg/*.py"]) == ["pkg/a.py"]


def test_a_repository_archive_at_a_commit_is_a_corpus_with_its_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "repo-abc123.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for rel, text in {"repo-abc123/pkg/__init__.py": "",
                          "repo-abc123/pkg/mod.py": _module("repo", "repo_sum", 2)}.items():
            data = text.encode()
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (got,) = resolve_corpora([{"source": f"file://{archive}#commit=abc123", "name": "repo",
                               "license": "MIT"}])
    assert got.key == "repo" and got.license == "MIT"
    assert (got.path / "pkg" / "mod.py").is_file()  # the archive's one top folder is the root
    assert got.metadata["commit"] == "abc123"
    assert got.sha256 == corpus_mod._file_sha256(archive)
    with pytest.raises(Exception, match="not found"):
        resolve_corpora([str(tmp_path / "missing.zip")])


def test_the_pipeline_gives_extract_and_the_tiny_model_every_corpus(three_corpora, tmp_path):
    from trackb_core.pipeline import plan
    from trackb_core.stage import hash_inputs

    setting, _ = three_corpora
    config = build_config(PipelineConfig, {"corpus": setting, "model": "tiny",
                                           "store": str(tmp_path)})
    wired = {step.folder: stage for step, stage in plan(config, LocalStore(tmp_path / "run"))}
    assert wired["extract"].corpus == wired["tiny-model"].corpus == config.corpus
    hashed = [hash_inputs(wired[name])["corpus"] for name in ("extract", "tiny-model")]
    assert hashed[0] == hashed[1]
    assert [c["key"] for c in hashed[0]["corpora"]] == ["alphapkg", "betapkg", "gamma"]


def test_the_tiny_model_trains_on_every_corpus(three_corpora, tmp_path):
    from trackb_core.tinymodel import TinyModelConfig, build_tiny_model

    setting, _ = three_corpora
    config = build_config(TinyModelConfig, {
        "corpus": setting, "vocab_size": 300, "hidden_size": 16, "num_layers": 1,
        "num_heads": 2, "num_kv_heads": 1, "seq_len": 16, "batch_size": 2,
        "pretrain_steps": 1})
    metrics = build_tiny_model(config, tmp_path / "model")
    # alphapkg/util.py; betapkg's _vendor/clamp.py, helpers.py, core.py; gamma/calc.py
    # (empty __init__.py files have no text; gamma's tests are left out by its glob)
    assert metrics["corpus_files"] == 5
