"""scripts/e2e_store.py, the kind e2e workflow's look into the store, against moto's real S3
server; its kubectl side (the Secret's keys) against a kubectl stand-in on PATH."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import stat

import boto3
import pytest

from . import ROOT

spec = importlib.util.spec_from_file_location("e2e_store", ROOT / "scripts" / "e2e_store.py")
e2e_store = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e_store)


def put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=body)


def test_report_is_found_and_printed_into_the_step_summary(s3_env, bucket, tmp_path,
                                                           monkeypatch, capsys):
    put(s3_env, bucket, "runs/kind-e2e/compare/report.md", b"# trackb report\n")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code = e2e_store.main(["report", "--endpoint", s3_env, "--bucket", bucket,
                           "--run-id", "kind-e2e"])
    assert code == 0
    assert summary.read_text() == "# trackb report\n"
    assert "runs/kind-e2e/compare/report.md: 16 characters" in capsys.readouterr().out


def test_a_missing_report_fails_with_one_line_naming_the_key(s3_env, bucket, capsys):
    code = e2e_store.main(["report", "--endpoint", s3_env, "--bucket", bucket,
                           "--run-id", "never-ran"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"e2e: s3://{bucket}/runs/never-ran/compare/report.md: NoSuchKey"


def test_an_empty_report_is_not_a_report(s3_env, bucket):
    put(s3_env, bucket, "runs/r/compare/report.md", b"\n  \n")
    with pytest.raises(LookupError, match="is empty"):
        e2e_store.check_report(s3_env, bucket, "r")


def test_download_copies_the_run_folder_and_nothing_else(s3_env, bucket, tmp_path):
    put(s3_env, bucket, "runs/r/extract/manifest.json", b"{}")
    put(s3_env, bucket, "runs/r/train/_k8s/train-0.log", b"log")
    put(s3_env, bucket, "runs/other/compare/report.md", b"not this run")
    count = e2e_store.download_run(s3_env, bucket, "r", tmp_path / "out")
    assert count == 2
    files = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["extract/manifest.json", "train/_k8s/train-0.log"]


def fake_kubectl(tmp_path, monkeypatch, stdout: str, code: int = 0) -> None:
    """A `kubectl` first on PATH that prints ``stdout`` (what `get secret -o
    jsonpath={.data}` would) and exits ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "kubectl"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_secret_keys_are_decoded_from_the_secret(tmp_path, monkeypatch):
    data = {k: base64.b64encode(v.encode()).decode() for k, v in
            {"AWS_ACCESS_KEY_ID": "trackb-e2e", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}.items()}
    fake_kubectl(tmp_path, monkeypatch, json.dumps(data))
    assert e2e_store.secret_keys("trackb", "trackb-minio-root") == {
        "AWS_ACCESS_KEY_ID": "trackb-e2e", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def test_a_secret_without_the_keys_is_named_in_the_error(tmp_path, monkeypatch):
    fake_kubectl(tmp_path, monkeypatch, json.dumps({"AWS_ACCESS_KEY_ID": "eA=="}))
    with pytest.raises(LookupError, match="trackb/s has no AWS_SECRET_ACCESS_KEY"):
        e2e_store.secret_keys("trackb", "s")


def test_endpoint_or_a_service_to_forward_to_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        e2e_store.main(["report", "--bucket", "b", "--run-id", "r"])
    assert exc.value.code == 2
    assert "give --endpoint, or --namespace, --service and --secret" in capsys.readouterr().err
