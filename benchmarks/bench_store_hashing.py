"""A rerun's memory and downloads when an input folder on S3 holds a model-sized file.

Issue 13: a rerun hashes every stored input. Loading each file whole OOM-killed the
in-cluster launcher (256 Mi request, 1 Gi limit) on a 3 GB model.safetensors at every
resume, and made a laptop download it again at every rerun. Here a moto S3 server runs
in a process of its own (it keeps objects in memory, and this process should not
swell with them). The bucket gets a folder with a SIZE_MIB ``model.safetensors``
uploaded by trackb, so it carries its sha256 in its metadata, and a copy of that file
written by someone else, with no metadata. A fresh child process then does what the
launcher does on a resume: ``cached_manifest`` of an eval stage whose --model is that
folder, twice. It reports its peak RSS and its GetObject calls per file. The baseline
is the same child hashing the old way (``get_bytes`` then sha256), run in the same
benchmark. Goal: peak RSS < 256 MiB, nothing trackb wrote is downloaded, and the
foreign file is downloaded once (the first check), not again.

tests/test_store_hashing.py runs the same check at ~300 MiB and asserts the goal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
SIZE_MIB = int(os.environ.get("TRACKB_BENCH_HASH_MIB", "2048"))
CHECKS = 2
RSS_GOAL_MIB = 256
TRACKB_FILE = "model/model.safetensors"
FOREIGN_FILE = "model/foreign.safetensors"


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process; yields its endpoint. Raises RuntimeError
    if it does not answer within a minute."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto server exited with {server.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start within 60 s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        # Its objects live in its memory (and its spooled temporary files): ending the
        # process frees them all.
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def s3_env(endpoint: str, cache: Path) -> dict[str, str]:
    """Environment variables pointing trackb at ``endpoint`` with fake credentials."""
    return {"TRACKB_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "TRACKB_CACHE": str(cache)}


def prepare(endpoint: str, work: Path, size_mib: int) -> dict:
    """Fill a fresh bucket on ``endpoint`` as a finished train run leaves it, plus the
    eval stage's earlier manifest. Returns the spec :func:`check_in_child` takes.

    The model file is sparse (a random first MiB, then zeros): this process writes and
    holds next to nothing, and put_file streams it up. Its foreign twin is made by a
    server-side copy that replaces the metadata with none, as a tool other than trackb
    would have written it. The manifest's fingerprint comes from hashing the local
    files, so a cache hit also shows that S3's digests are the ones the old way gives.
    """
    import boto3

    from trackb_core.stage import MANIFEST, fingerprint, tree_sha256
    from trackb_core.store import LocalStore, S3Store, file_sha256, make_s3_client

    bucket = "trackb-rerun"
    model = work / "model"
    model.mkdir(parents=True)
    with open(model / "model.safetensors", "wb") as fh:
        fh.write(os.urandom(1024 * 1024))
        fh.truncate(size_mib * 1024 * 1024)
    os.link(model / "model.safetensors", model / "foreign.safetensors")
    (work / "test.jsonl").write_text('{"id": "t1", "prompt": "p", "reference": "r"}\n')
    with mock.patch.dict(os.environ, s3_env(endpoint, work / "cache")):
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        store = S3Store(bucket, "run", client=make_s3_client())
        store.put_file(TRACKB_FILE, model / "model.safetensors")
        store.client.copy_object(
            Bucket=bucket, Key=f"run/{FOREIGN_FILE}", MetadataDirective="REPLACE",
            CopySource={"Bucket": bucket, "Key": f"run/{TRACKB_FILE}"})
        store.put_file("build-dataset/test.jsonl", work / "test.jsonl")
        spec = {"dataset": f"{store.uri}/build-dataset", "model": f"{store.uri}/model",
                "out": f"{store.uri}/eval", "checks": CHECKS}
        inputs = {"dataset": {"sha256": file_sha256(work / "test.jsonl")},
                  "model": {"sha256": tree_sha256(LocalStore(model))}}
        manifest = {"stage": "evaluate", "outputs": {},
                    "fingerprint": fingerprint(_config(spec), inputs)}
        store.put_text(f"eval/{MANIFEST}", json.dumps(manifest))
    return spec


def _config(spec: dict):
    from trackb_core.evaluate import EvalConfig

    return EvalConfig(dataset=spec["dataset"], model=spec["model"], tag="rerun")


def check_in_child(spec: dict, env: dict[str, str], old_way: bool = False) -> dict:
    """Run the rerun's cache check ``spec["checks"]`` times in a fresh process.

    Returns ``{"peak_rss_mib", "start_rss_mib", "checks": [{"hit", "seconds", "gets":
    {file: GetObject calls}}]}``. Raises RuntimeError if the child fails.
    """
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_store_hashing", "--child",
         json.dumps({**spec, "old_way": old_way})],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the check failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(spec: dict) -> dict:
    """The child's side of :func:`check_in_child`: everything it measures is its own."""
    import hashlib

    from trackb_core import store as store_module
    from trackb_core.stage import cached_manifest

    gets: Counter[str] = Counter()
    make_client = store_module.make_s3_client

    def counting_client(*args, **kwargs):
        client = make_client(*args, **kwargs)
        client.meta.events.register(
            "before-parameter-build.s3.GetObject",
            lambda params, **_: gets.update([params["Key"].split("/", 1)[1]]))
        return client

    store_module.make_s3_client = counting_client
    if spec["old_way"]:
        # What every input hash did before issue 13: the whole object in memory.
        store_module.S3Store.sha256 = (
            lambda self, key: hashlib.sha256(self.get_bytes(key)).hexdigest())
    config = _config(spec)
    out = store_module.open_store(spec["out"])
    start_rss = _peak_rss_mib()
    checks = []
    for _ in range(spec["checks"]):
        gets.clear()
        started = time.perf_counter()
        hit = cached_manifest(config, out) is not None
        checks.append({"hit": hit, "seconds": round(time.perf_counter() - started, 2),
                       "gets": dict(gets)})
    return {"peak_rss_mib": _peak_rss_mib(), "start_rss_mib": start_rss, "checks": checks}


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB.

    VmHWM where Linux has it: ru_maxrss survives exec, and subprocess's vfork hands the
    child its parent's peak (a test runner's, or this benchmark's while it uploads).
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gets(result: dict, name: str) -> str:
    return "/".join(str(check["gets"].get(name, 0)) for check in result["checks"])


def _line(label: str, result: dict) -> str:
    hits = "hit" if all(c["hit"] for c in result["checks"]) else "MISS"
    seconds = "/".join(f"{c['seconds']:.1f}" for c in result["checks"])
    return (f"  {label}: peak RSS {result['peak_rss_mib']:.0f} MiB (before the first check "
            f"{result['start_rss_mib']:.0f}); GetObject per check: trackb's file "
            f"{_gets(result, TRACKB_FILE)}, foreign file {_gets(result, FOREIGN_FILE)}; "
            f"{seconds} s; cache {hits}")


def main() -> None:
    try:
        import moto  # noqa: F401
    except ImportError:
        print("bench_store_hashing: skipped: moto is not installed (pip install moto[server])")
        return
    with tempfile.TemporaryDirectory(prefix="bench-hashing-") as tmp:
        work = Path(tmp)
        with moto_server() as endpoint:
            started = time.perf_counter()
            spec = prepare(endpoint, work, SIZE_MIB)
            setup = time.perf_counter() - started
            env = s3_env(endpoint, work / "cache")
            old = check_in_child(spec, env, old_way=True)
            new = check_in_child(spec, env)
    print(f"store hashing: a rerun's cache check ({CHECKS}x, fresh process) over a "
          f"{SIZE_MIB} MiB model file trackb uploaded + a {SIZE_MIB} MiB copy another tool "
          f"wrote (moto S3, set up in {setup:.0f} s)")
    print(_line("old (get_bytes + sha256)", old))
    print(_line("new (Store.sha256)      ", new))
    met = (new["peak_rss_mib"] < RSS_GOAL_MIB and _gets(new, TRACKB_FILE) == "0/0"
           and _gets(new, FOREIGN_FILE) == "1/0")
    print(f"  ratio old/new peak RSS {old['peak_rss_mib'] / new['peak_rss_mib']:.1f}x; goal "
          f"< {RSS_GOAL_MIB} MiB, trackb's file never downloaded, the foreign one once: "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(json.loads(sys.argv[2]))))
    else:
        main()
