"""The artifact store contract, run against LocalStore and against S3Store over HTTP.

The S3 side talks to moto's real S3 server (``ThreadedMotoServer``) through boto3, so
every request is a real protocol round trip: signing, path-style URLs, multipart,
XML error bodies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import uuid
from pathlib import Path

import pytest

from trackb_core import store as store_module
from trackb_core.errors import (
    ConfigError,
    MissingInputError,
    StoreError,
    UnavailableError,
)
from trackb_core.store import (
    PROBE_PREFIX,
    TMP_SUFFIX,
    LocalStore,
    S3Store,
    make_s3_client,
    open_store,
    split_uri,
)

REGION = "us-east-1"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same contract over both implementations, each rooted below a sub-folder."""
    if request.param == "local":
        return open_store(str(tmp_path / "store" / "base"))
    name = request.getfixturevalue("bucket")
    return open_store(f"s3://{name}/base")


# -- the shared contract ------------------------------------------------------------


def test_bytes_and_text_round_trip(store):
    payload = bytes(range(256)) * 3
    store.put_bytes("blob.bin", payload)
    store.put_bytes("empty.bin", b"")
    store.put_text("notes/readme.md", "héllo — ünïcode\nline 2\n")

    assert store.get_bytes("blob.bin") == payload
    assert store.get_bytes("empty.bin") == b""
    assert store.get_text("notes/readme.md") == "héllo — ünïcode\nline 2\n"
    assert store.size("blob.bin") == len(payload)


def test_overwrite_replaces_content(store):
    store.put_text("a.txt", "first version, longer")
    store.put_text("a.txt", "second")

    assert store.get_text("a.txt") == "second"
    assert store.list() == ["a.txt"]


def test_exists_is_true_only_for_objects(store):
    store.put_text("dir/file.txt", "x")

    assert store.exists("dir/file.txt")
    assert not store.exists("dir/other.txt")
    assert not store.exists("dir")  # a folder is not an object
    assert store.is_dir("dir")
    assert not store.is_dir("dir/file.txt")
    assert not store.is_dir("nothing")


def test_list_is_recursive_sorted_and_relative(store):
    for key in ("z.txt", "a/b/c.txt", "a/bc/d.txt", "a/b.txt", "a/b/deep/e.txt", "m.txt"):
        store.put_text(key, key)

    assert store.list() == [
        "a/b.txt", "a/b/c.txt", "a/b/deep/e.txt", "a/bc/d.txt", "m.txt", "z.txt",
    ]
    # "a/b" is the folder a/b, never the sibling a/bc nor the file a/b.txt.
    assert store.list("a/b") == ["a/b/c.txt", "a/b/deep/e.txt"]
    assert store.list("a/b/") == ["a/b/c.txt", "a/b/deep/e.txt"]
    assert store.list("a/b.txt") == ["a/b.txt"]
    assert store.list("a") == ["a/b.txt", "a/b/c.txt", "a/b/deep/e.txt", "a/bc/d.txt"]
    assert store.list("nothing") == []


def test_list_of_an_empty_store_is_empty(store):
    assert store.list() == []


def test_delete_a_key_and_a_prefix(store):
    for key in ("keep.txt", "a/b/c.txt", "a/b/d/e.txt", "a/bc/f.txt", "gone.txt"):
        store.put_text(key, key)

    store.delete("gone.txt")
    assert store.list() == ["a/b/c.txt", "a/b/d/e.txt", "a/bc/f.txt", "keep.txt"]

    store.delete("a/b")
    assert store.list() == ["a/bc/f.txt", "keep.txt"]  # the sibling a/bc survives

    store.delete("never/was/here")  # missing is not an error
    store.delete("gone.txt")
    assert store.list() == ["a/bc/f.txt", "keep.txt"]


def test_missing_key_raises_missing_input_error(store, tmp_path):
    store.put_text("present.txt", "x")

    with pytest.raises(MissingInputError, match="absent.txt"):
        store.get_bytes("absent.txt")
    with pytest.raises(MissingInputError, match="absent.txt"):
        store.get_text("absent.txt")
    with pytest.raises(MissingInputError, match="absent.txt"):
        store.get_file("absent.txt", tmp_path / "out.txt")
    with pytest.raises(MissingInputError, match="absent.txt"):
        store.size("absent.txt")
    with pytest.raises(MissingInputError, match="nothing stored under"):
        store.get_dir("no-such-folder", tmp_path / "dl")
    assert not (tmp_path / "out.txt").exists()


def test_put_file_and_get_file_round_trip(store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(200_000))

    store.put_file("models/weights.bin", source)
    target = tmp_path / "down" / "nested" / "copy.bin"
    store.get_file("models/weights.bin", target)

    assert target.read_bytes() == source.read_bytes()
    assert store.list() == ["models/weights.bin"]


def test_put_dir_and_get_dir_round_trip(store, tmp_path):
    local = tmp_path / "adapter"
    files = {
        "adapter_config.json": b'{"r": 8}\n',
        "adapter_model.safetensors": os.urandom(4096),
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges/m.txt": b"a b\n",
    }
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)

    store.put_dir("run/adapter", local)
    assert store.list("run/adapter") == sorted(f"run/adapter/{rel}" for rel in files)

    back = store.get_dir("run/adapter", tmp_path / "back")
    assert back == tmp_path / "back"
    got = {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    assert got == files


def test_get_dir_of_the_whole_store(store, tmp_path):
    store.put_text("x.txt", "1")
    store.put_text("sub/y.txt", "2")

    back = store.get_dir("", tmp_path / "all")

    assert (back / "x.txt").read_text() == "1"
    assert (back / "sub" / "y.txt").read_text() == "2"


def test_child_is_scoped_to_its_subfolder(store):
    store.put_text("outside.txt", "o")
    child = store.child("runs/r1/extract")
    child.put_text("functions.jsonl", "{}\n")

    assert child.uri == store.uri + "/runs/r1/extract"
    assert child.list() == ["functions.jsonl"]
    assert child.get_text("functions.jsonl") == "{}\n"
    assert not child.exists("outside.txt")
    assert store.list() == ["outside.txt", "runs/r1/extract/functions.jsonl"]
    assert store.child("runs").child("r1").list() == ["extract/functions.jsonl"]

    child.delete("")  # deleting a child's root removes only that folder
    assert store.list() == ["outside.txt"]


def test_open_store_on_the_uri_gives_the_same_store(store):
    store.put_text("k/v.txt", "same")

    reopened = open_store(store.uri)

    assert type(reopened) is type(store)
    assert reopened.get_text("k/v.txt") == "same"


def test_check_writable_passes_and_leaves_nothing(store):
    store.check_writable()

    assert store.list() == []


def test_keys_cannot_climb_out_of_the_store(store):
    with pytest.raises(ConfigError, match=r"\.\."):
        store.put_text("../escape.txt", "x")
    with pytest.raises(ConfigError, match=r"\.\."):
        store.child("a/../../b")


# -- open_store and split_uri -------------------------------------------------------


def test_open_store_picks_the_implementation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    s3 = open_store("s3://bucket-name/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket-name", "some/prefix", "s3://bucket-name/some/prefix")
    bare = open_store("s3://bucket-name")
    assert (bare.bucket, bare.prefix, bare.uri) == ("bucket-name", "", "s3://bucket-name")

    file_store = open_store("file:///x/y")
    assert isinstance(file_store, LocalStore)
    assert file_store.root == Path("/x/y")
    assert open_store("file:///tmp/with%20space").root == Path("/tmp/with space")

    relative = open_store("rel/path")
    assert isinstance(relative, LocalStore)
    assert relative.root == tmp_path / "rel" / "path"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/x", "unsupported store URI scheme 'ftp'"),
        ("gs://bucket/x", "unsupported store URI scheme 'gs'"),
        ("s3:///prefix-only", "no bucket"),
        ("file://otherhost/x", "names host"),
    ],
)
def test_open_store_rejects_bad_uris(uri, message):
    with pytest.raises(ConfigError, match=message):
        open_store(uri)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://b/a/c.jsonl", ("s3://b/a", "c.jsonl")),
        ("s3://b/c.jsonl", ("s3://b", "c.jsonl")),
        ("runs/r1/extract/tasks.jsonl", ("runs/r1/extract", "tasks.jsonl")),
        ("runs/r1/extract/", ("runs/r1", "extract")),
        ("tasks.jsonl", (".", "tasks.jsonl")),
        ("/tasks.jsonl", ("/", "tasks.jsonl")),
        ("file:///x/tasks.jsonl", ("file:///x", "tasks.jsonl")),
    ],
)
def test_split_uri(uri, expected):
    assert split_uri(uri) == expected


# -- S3 only --------------------------------------------------------------------------


def test_s3_multipart_upload_round_trips(bucket, tmp_path, monkeypatch):
    five_mib = 5 * 1024 * 1024
    monkeypatch.setattr(store_module, "MULTIPART_THRESHOLD", five_mib)
    monkeypatch.setattr(store_module, "MULTIPART_CHUNK", five_mib)
    s3 = open_store(f"s3://{bucket}/big")
    data = os.urandom(11 * 1024 * 1024)  # three parts: 5 + 5 + 1 MiB
    source = tmp_path / "big.bin"
    source.write_bytes(data)

    s3.put_file("from-file.bin", source)
    s3.put_bytes("from-bytes.bin", data)

    for key in ("from-file.bin", "from-bytes.bin"):
        etag = s3.client.head_object(Bucket=bucket, Key=f"big/{key}")["ETag"].strip('"')
        assert etag.endswith("-3"), f"{key} was not uploaded in 3 parts (ETag {etag})"
        assert s3.size(key) == len(data)
        assert hashlib.sha256(s3.get_bytes(key)).digest() == hashlib.sha256(data).digest()
    s3.get_file("from-file.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_s3_missing_bucket_is_a_store_error_naming_it(s3_env, tmp_path):
    missing = S3Store(f"no-such-bucket-{uuid.uuid4().hex[:8]}", "p")
    source = tmp_path / "f.txt"
    source.write_text("x")

    for attempt in (
        lambda: missing.put_bytes("k.txt", b"x"),
        lambda: missing.put_file("k.txt", source),  # boto3 wraps this one in S3UploadFailedError
        lambda: missing.get_bytes("k.txt"),
        lambda: missing.list(),
        missing.check_writable,
    ):
        with pytest.raises(StoreError, match=f"bucket '{missing.bucket}' does not exist"):
            attempt()


def test_s3_wrong_credentials_are_a_store_error(bucket, monkeypatch):
    # moto only checks signatures once INITIAL_NO_AUTH_ACTION_COUNT requests have passed;
    # the server runs in this process, so lowering it to 0 turns checking on at once.
    import moto.settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3 = S3Store(bucket, "p")

    with pytest.raises(StoreError, match="credentials rejected") as write:
        s3.put_bytes("k.txt", b"x")
    with pytest.raises(StoreError, match="credentials rejected"):
        s3.list()
    assert write.value.exit_code == StoreError.exit_code
    assert not isinstance(write.value, UnavailableError)  # retrying cannot help


def test_s3_unreachable_endpoint_is_unavailable(s3_env, monkeypatch, closed_port):
    monkeypatch.setenv("TRACKB_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    # One attempt: the default retries would only make this test slow.
    s3 = S3Store("any-bucket", "p", client=make_s3_client(max_attempts=1))

    with pytest.raises(UnavailableError, match="unreachable") as err:
        s3.get_bytes("k.txt")
    with pytest.raises(UnavailableError, match="unreachable"):
        s3.put_bytes("k.txt", b"x")
    assert err.value.exit_code == UnavailableError.exit_code == 75


def test_s3_client_settings_are_minio_safe(s3_env):
    client = make_s3_client()
    config = client.meta.config

    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path"
    assert client.meta.endpoint_url == s3_env


def test_s3_requests_use_path_style_and_send_no_default_crc(bucket):
    s3 = open_store(f"s3://{bucket}/base")
    sent = []
    s3.client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append((request.url, dict(request.headers)))
    )

    s3.put_bytes("dir/k.txt", b"payload")

    url, headers = sent[-1]
    endpoint = os.environ["TRACKB_S3_ENDPOINT_URL"]
    assert url == f"{endpoint}/{bucket}/base/dir/k.txt"  # bucket in the path, not the host
    assert not any(h.lower().startswith("x-amz-checksum") for h in headers)


def test_s3_delete_objects_sends_content_md5(bucket):
    s3 = open_store(f"s3://{bucket}/base")
    s3.put_text("a.txt", "1")
    s3.put_text("b.txt", "2")
    sent = []
    s3.client.meta.events.register(
        "before-send.s3.DeleteObjects", lambda request, **_: sent.append(request)
    )

    s3.delete("")

    assert s3.list() == []
    (request,) = sent
    body = request.body if isinstance(request.body, bytes) else request.body.encode()
    expected = base64.b64encode(hashlib.md5(body).digest()).decode()
    header = request.headers["Content-MD5"]
    assert (header.decode() if isinstance(header, bytes) else header) == expected


def test_s3_failed_deletes_are_reported(s3_env):
    from botocore.stub import Stubber

    client = make_s3_client()
    s3 = S3Store("bucket", "p", client=client)
    with Stubber(client) as stub:
        stub.add_response(
            "list_objects_v2",
            {"Contents": [{"Key": "p/a.txt"}, {"Key": "p/b.txt"}], "IsTruncated": False},
        )
        stub.add_response(
            "delete_objects",
            {"Errors": [{"Key": "p/a.txt", "Code": "AccessDenied", "Message": "Access Denied"}]},
        )
        with pytest.raises(StoreError, match="cannot delete s3://bucket/p/a.txt: AccessDenied"):
            s3.delete("")


def test_s3_folder_markers_are_not_listed(bucket):
    s3 = open_store(f"s3://{bucket}/base")
    s3.client.put_object(Bucket=bucket, Key="base/folder/", Body=b"")
    s3.put_text("folder/real.txt", "x")

    assert s3.list() == ["folder/real.txt"]


def test_s3_child_shares_the_client(bucket):
    s3 = open_store(f"s3://{bucket}")
    client = s3.client

    assert s3.child("a/b").client is client
    assert s3.child("a/b").uri == f"s3://{bucket}/a/b"


# -- local only ---------------------------------------------------------------------


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    """A folder this process cannot write into, even when the tests run as root."""
    if os.geteuid() == 0:
        # root ignores permission bits; nobody can create a folder below a regular file.
        blocker = tmp_path / "regular-file"
        blocker.write_text("not a folder")
        yield blocker / "sub"
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield locked
    locked.chmod(0o700)


def test_local_unwritable_folder_is_a_store_error(unwritable_dir):
    store = LocalStore(unwritable_dir)

    with pytest.raises(StoreError, match="cannot write") as err:
        store.check_writable()
    assert str(unwritable_dir) in str(err.value)
    with pytest.raises(StoreError, match="cannot write"):
        store.put_bytes("manifest.json", b"{}")
    with pytest.raises(StoreError, match="cannot write"):
        store.child("runs/r1").put_text("x.txt", "x")
    assert err.value.exit_code == 73


def test_local_writes_leave_no_temp_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    source = tmp_path / "src.bin"
    source.write_bytes(b"abc" * 1000)

    store.put_bytes("a/x.bin", b"1")
    store.put_file("a/y.bin", source)
    store.get_file("a/y.bin", tmp_path / "dl" / "y.bin")
    store.check_writable()

    assert store.list() == ["a/x.bin", "a/y.bin"]
    on_disk = [p.name for p in (tmp_path / "s").rglob("*")]
    on_disk += [p.name for p in (tmp_path / "dl").rglob("*")]
    assert not [n for n in on_disk if n.endswith(TMP_SUFFIX) or n.startswith(PROBE_PREFIX)]


def test_local_failed_write_leaves_no_temp_file(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_text("taken/inner.txt", "x")

    # The key names an existing folder: the rename fails after the temp file exists.
    with pytest.raises(StoreError, match="cannot write"):
        store.put_bytes("taken", b"data")

    assert sorted(os.listdir(tmp_path / "s")) == ["taken"]
    assert store.list() == ["taken/inner.txt"]


def test_local_list_hides_temp_files_of_writes_in_flight(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_text("done.txt", "x")
    (tmp_path / "s" / f".half.txt.abc{TMP_SUFFIX}").write_text("partial")

    assert store.list() == ["done.txt"]


def test_local_files_follow_the_umask(tmp_path):
    store = LocalStore(tmp_path / "s")
    old = os.umask(0o022)
    try:
        store.put_text("a.txt", "x")
        source = tmp_path / "src"
        source.write_text("y")
        store.put_file("b.txt", source)
    finally:
        os.umask(old)

    for name in ("a.txt", "b.txt"):
        mode = stat.S_IMODE((tmp_path / "s" / name).stat().st_mode)
        assert mode == 0o644, f"{name} has mode {oct(mode)}"


def test_local_missing_upload_source_is_a_store_error(tmp_path):
    store = LocalStore(tmp_path / "s")

    with pytest.raises(StoreError, match="cannot read"):
        store.put_file("x", tmp_path / "does-not-exist")
