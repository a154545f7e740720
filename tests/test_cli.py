"""The command-line contract: names, help, and one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trackb_core.cli import main
from trackb_core.errors import EXIT_CANT_CREATE, EXIT_CONFIG, EXIT_DATA, EXIT_NO_INPUT
from trackb_core.stages import COMMANDS as STAGE_COMMANDS

COMMANDS = [spec.name for spec in STAGE_COMMANDS] + ["run-all", "render", "preflight",
                                                    "status", "logs", "delete"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_top_level_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_explains_inputs_outputs_and_defaults(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    text = result.output
    assert len(text) > 300
    if name not in ("run-all", "render", "preflight", "status", "logs", "delete"):
        assert "--out" in text and "--config" in text
        assert "[default:" in text
    for spec in STAGE_COMMANDS:
        if spec.name == name:
            _, cls = spec.load()
            for field, info in cls.model_fields.items():
                assert info.description, f"{cls.__name__}.{field} has no description"
                if field not in spec.positional:
                    assert "--" + field.replace("_", "-") in text


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines, "no error printed"
    assert lines[-1].startswith("trackb: error: "), result.output
    return lines[-1]


def test_missing_dataset_uri_is_one_line_and_exit_66(tmp_path):
    out = tmp_path / "train"
    result = invoke("train", "--dataset", str(tmp_path / "nope"), "--model", str(tmp_path),
                    "--out", str(out))
    assert result.exit_code == EXIT_NO_INPUT
    assert "dataset" in one_line_error(result)
    assert not (out / "manifest.json").exists()


def test_unwritable_store_is_exit_73(tmp_path, stdlib_corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("extract", "--corpus", str(stdlib_corpus), "--out", str(blocker / "out"))
    assert result.exit_code == EXIT_CANT_CREATE
    assert "cannot write" in one_line_error(result)


def test_bad_config_file_is_exit_64(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: [unclosed\n")
    result = invoke("train", "--config", str(config), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_CONFIG
    assert "not valid YAML" in one_line_error(result)


def test_unknown_config_key_names_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochz: 3\n")
    result = invoke("train", "--config", str(config), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_CONFIG
    assert "epochz" in one_line_error(result)


def test_empty_corpus_dir_is_exit_65(tmp_path):
    corpus = tmp_path / "empty"
    corpus.mkdir()
    result = invoke("extract", "--corpus", str(corpus), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_DATA
    assert str(corpus) in one_line_error(result)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_corrupt_jsonl_input_names_the_line(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a"}\nnot json\n')
    result = invoke("generate", "--tasks", str(tasks), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_DATA
    assert "line 2" in one_line_error(result)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_run_all_rejects_bad_run_id(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("model: tiny\n")
    result = invoke("run-all", "--config", str(config), "--run-id", "Bad_ID",
                    "--store", str(tmp_path))
    assert result.exit_code == EXIT_CONFIG
    assert "run_id" in one_line_error(result)


def test_stage_runs_as_python_dash_m_jobs(tmp_path, stdlib_corpus):
    out = tmp_path / "extract"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.extract", "--corpus", str(stdlib_corpus),
         "--out", str(out), "--max-functions", "20"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "extract"
    assert (out / "functions.jsonl").exists() and (out / "tasks.jsonl").exists()


def test_jobs_entry_returns_the_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.extract", "--corpus", str(tmp_path / "missing"),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120,
    )
    assert proc.returncode == EXIT_NO_INPUT
    assert proc.stderr.strip().splitlines()[-1].startswith("trackb: error: ")


def test_missing_required_input_is_exit_64(tmp_path):
    result = invoke("generate", "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_CONFIG
    assert "--tasks" in one_line_error(result)


def test_stages_on_s3_write_the_same_files_as_local(bucket, tmp_path, stdlib_corpus):
    """extract -> generate -> build-dataset with every URI on moto's S3 server."""
    from trackb_core.store import open_store

    s3 = f"s3://{bucket}/runs/s3run"
    local = tmp_path / "runs" / "local"
    for root in (s3, str(local)):
        steps = [
            ("extract", "--corpus", str(stdlib_corpus), "--max-functions", "30"),
            ("generate", "--tasks", f"{root}/extract"),
            ("build-dataset", "--responses", f"{root}/generate/responses.jsonl"),
        ]
        for command, *args in steps:
            result = invoke(command, *args, "--out", f"{root}/{command}")
            assert result.exit_code == 0, result.output
    store = open_store(s3)
    keys = set(store.list())
    for rel in ("extract/functions.jsonl", "extract/tasks.jsonl", "generate/responses.jsonl",
                "build-dataset/train.jsonl", "build-dataset/test.jsonl",
                "build-dataset/README.md"):
        assert rel in keys
        assert store.get_bytes(rel) == (local / rel).read_bytes(), rel
    # The manifests are written last and record the same input hashes as locally.
    for stage in ("extract", "generate", "build-dataset"):
        remote = json.loads(store.get_bytes(f"{stage}/manifest.json"))
        here = json.loads((local / stage / "manifest.json").read_text())
        assert remote["fingerprint"] == here["fingerprint"]


@pytest.mark.parametrize("case", ["syntax_error", "not_utf8", "unknown_pypi"])
def test_bad_corpus_via_cli_is_one_line_nonzero_and_leaves_no_manifest(case, tmp_path,
                                                                       monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if case == "syntax_error":
        (corpus / "bad.py").write_text("def f(:\n    pass\n")
        source, code, words = str(corpus), EXIT_DATA, "syntax_error=1"
    elif case == "not_utf8":
        (corpus / "latin.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
        source, code, words = str(corpus), EXIT_DATA, "not_utf8=1"
    else:
        pytest.importorskip("pip")
        monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
        source, code, words = "pypi:no-such-package-trackb-xyz==0.0.1", EXIT_NO_INPUT, \
            "no distribution"
    out = tmp_path / "out"
    result = invoke("extract", "--corpus", source, "--out", str(out))
    assert result.exit_code == code
    assert words in one_line_error(result)
    assert not (out / "manifest.json").exists()
