"""What the kind e2e workflow (.github/workflows/e2e-kind.yml) asks of the store.

    python scripts/e2e_store.py report   --bucket B --run-id R --namespace NS --service SVC --secret S
    python scripts/e2e_store.py download --bucket B --run-id R --namespace NS --service SVC --secret S --out DIR
    python scripts/e2e_store.py report   --bucket B --run-id R --endpoint http://127.0.0.1:9000

``report`` exits 0 when ``s3://B/runs/R/compare/report.md`` exists and is not empty,
printing it (and appending it to ``$GITHUB_STEP_SUMMARY`` when set); else exit 1 with one
line saying what is missing. ``download`` copies everything under ``runs/R/`` (stage
outputs and the ``_k8s/`` logs the launcher saved) into DIR, for the failure artifact.

With ``--namespace/--service/--secret`` it reaches the chart's dev MinIO the way a user
would: ``kubectl port-forward`` to the Service on a free local port, and the keys read from
the Secret the MinIO root user comes from (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
With ``--endpoint`` it uses that URL and boto3's own credential chain.

Why a script and not trackb's Store: the runner installs boto3 alone (seconds), not
trackb with torch (minutes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

KEY_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _client(endpoint: str, keys: dict[str, str] | None = None):
    import boto3

    credentials = {"aws_access_key_id": keys[KEY_NAMES[0]],
                   "aws_secret_access_key": keys[KEY_NAMES[1]]} if keys else {}
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)


def secret_keys(namespace: str, secret: str) -> dict[str, str]:
    """The S3 keys held by a Secret (read with kubectl). Raises LookupError when the Secret
    or one of its two keys is missing."""
    result = subprocess.run(["kubectl", "-n", namespace, "get", "secret", secret,
                             "-o", "jsonpath={.data}"], capture_output=True, text=True)
    if result.returncode != 0:
        raise LookupError(f"secret {namespace}/{secret}: {result.stderr.strip()}")
    data = json.loads(result.stdout or "{}")
    missing = [k for k in KEY_NAMES if k not in data]
    if missing:
        raise LookupError(f"secret {namespace}/{secret} has no {', '.join(missing)}")
    return {k: base64.b64decode(data[k]).decode() for k in KEY_NAMES}


@contextlib.contextmanager
def port_forward(namespace: str, service: str, port: int = 9000) -> Iterator[str]:
    """``kubectl port-forward`` to ``svc/<service>`` on a free local port; yields its URL.
    Raises RuntimeError when kubectl exits before it forwards."""
    with socket.socket() as probe:  # a free port now; kubectl binds it next
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
    proc = subprocess.Popen(["kubectl", "-n", namespace, "port-forward", f"svc/{service}",
                             f"{local}:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # kubectl prints "Forwarding from 127.0.0.1:<port> -> 9000" once it listens.
        line = proc.stdout.readline()
        if "Forwarding from" not in line:
            raise RuntimeError(f"kubectl port-forward svc/{service}: {line.strip() or 'exited'}")
        yield f"http://127.0.0.1:{local}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def report_key(run_id: str) -> str:
    """The store key of a run's report (the compare stage's output)."""
    return f"runs/{run_id}/compare/report.md"


def check_report(endpoint: str, bucket: str, run_id: str,
                 keys: dict[str, str] | None = None) -> str:
    """The report's text. Raises LookupError when it is missing or empty."""
    from botocore.exceptions import ClientError

    key = report_key(run_id)
    try:
        body = _client(endpoint, keys).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        raise LookupError(f"s3://{bucket}/{key}: {exc.response['Error']['Code']}") from exc
    text = body.decode("utf-8", errors="replace")
    if not text.strip():
        raise LookupError(f"s3://{bucket}/{key} is empty")
    return text


def download_run(endpoint: str, bucket: str, run_id: str, out: Path,
                 keys: dict[str, str] | None = None) -> int:
    """Copy every object under ``runs/<run_id>/`` into ``out``; returns how many."""
    client = _client(endpoint, keys)
    prefix = f"runs/{run_id}/"
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            target = out / item["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target))
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["report", "download"])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--endpoint", help="the store's URL (else port-forward --service)")
    parser.add_argument("--namespace", help="the release's namespace")
    parser.add_argument("--service", help="the MinIO Service to port-forward to")
    parser.add_argument("--secret", help="the Secret holding the MinIO root keys")
    parser.add_argument("--out", type=Path, help="download: the folder to copy into")
    args = parser.parse_args(argv)
    if args.command == "download" and args.out is None:
        parser.error("download needs --out")
    if not args.endpoint and not (args.namespace and args.service and args.secret):
        parser.error("give --endpoint, or --namespace, --service and --secret")
    with contextlib.ExitStack() as stack:
        try:
            keys = secret_keys(args.namespace, args.secret) if args.secret else None
            endpoint = args.endpoint or stack.enter_context(
                port_forward(args.namespace, args.service))
            if args.command == "download":
                count = download_run(endpoint, args.bucket, args.run_id, args.out, keys)
                print(f"{count} objects of s3://{args.bucket}/runs/{args.run_id}/ -> {args.out}")
                return 0
            text = check_report(endpoint, args.bucket, args.run_id, keys)
        except (LookupError, RuntimeError) as exc:
            print(f"e2e: {exc}", file=sys.stderr)
            return 1
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(text)
    print(text)
    print(f"s3://{args.bucket}/{report_key(args.run_id)}: {len(text)} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
