"""The artifact store: the one door through which stages read and write artifacts.

Two implementations, chosen by URI:

* a local path or ``file://`` URI -> :class:`LocalStore`;
* ``s3://bucket/prefix`` -> :class:`S3Store` (boto3; any S3-compatible server).

Keys are ``/``-separated paths relative to the store's root. A store can be narrowed
to a sub-folder with :meth:`Store.child`, which is how a stage gets its ``--out``.

S3 settings come from the standard AWS environment and credential chain. The endpoint
is ``TRACKB_S3_ENDPOINT_URL`` if set, else boto3's own ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; pods and laptops often need different endpoints, so it is never
baked into configs.

:meth:`Store.sha256` hashes a stored file without holding it (a rerun hashes every
input). An S3 object that trackb uploaded carries its sha256 in its metadata, so it is
not downloaded to be hashed; any other object is hashed once per version and its
digest kept in ``$TRACKB_CACHE/s3-sha256.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from trackb_core.errors import (
    ConfigError,
    MissingInputError,
    StoreError,
    TrackbError,
    UnavailableError,
)

# Objects above this size go up in parts; S3's minimum part size is 5 MiB.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
# Local writes go to a temporary name first; listings never show these.
TMP_SUFFIX = ".trackb-tmp"
PROBE_PREFIX = ".trackb-write-probe"
# Hashing reads this much at a time: memory stays flat whatever a file's size.
HASH_CHUNK = 1024 * 1024
# The S3 user metadata (x-amz-meta-sha256) in which trackb records what it uploads.
SHA256_METADATA = "sha256"
# $TRACKB_CACHE/<this>: digests of S3 objects that carry no recorded sha256.
DIGEST_CACHE = "s3-sha256.json"
DIGEST_CACHE_ENTRIES = 4096
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _check_key(key: str) -> str:
    """``key`` without outer slashes. Raises ConfigError if it climbs out with ``..``."""
    key = str(key).strip("/")
    if ".." in key.split("/"):
        # Keys are joined onto a root; ".." would let a run id write outside it.
        raise ConfigError(f"store key {key!r} must not contain '..'")
    return key


class Store(ABC):
    """A folder of artifacts, local or remote. Keys are relative ``a/b/c`` paths."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically. Raises StoreError if not writable."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read ``key``. Raises MissingInputError if absent, StoreError if unreadable."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` is an object (not a folder)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The size of ``key`` in bytes. Raises MissingInputError if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted, relative to this store.

        ``prefix`` matches a key exactly or as a folder: ``"a/b"`` never matches ``"a/bc"``.
        """

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete ``prefix`` itself and everything under it. Missing is not an error.

        Raises StoreError if something could not be deleted.
        """

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file to ``key`` (multipart when large). Raises StoreError."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` to a local file. Raises MissingInputError if absent."""

    @abstractmethod
    def child(self, subpath: str) -> Store:
        """The same store narrowed to ``subpath``. Raises ConfigError on ``..``."""

    def sha256(self, key: str) -> str:
        """The sha256 (hex) of ``key``'s content, read in chunks and never held whole.

        Raises MissingInputError if absent, StoreError if unreadable.
        """
        # The fallback for a store that knows no better way: the disk holds the
        # download, not memory. LocalStore and S3Store override it.
        try:
            with tempfile.TemporaryDirectory(prefix="trackb-sha256-") as tmp:
                path = Path(tmp) / "object"
                self.get_file(key, path)
                return file_sha256(path)
        except OSError as exc:
            raise StoreError(f"cannot hash {self.uri}/{key}: {exc.strerror or exc}") from exc

    def check_writable(self) -> None:
        """Raise StoreError now, with the reason, if this store cannot be written."""
        # A unique name: two stages may probe the same store at the same time.
        probe = f"{PROBE_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"")
        self.delete(probe)

    def is_dir(self, key: str) -> bool:
        """True if anything is stored under ``key/`` (a lone object is not a folder)."""
        key = key.strip("/")
        return any(k != key for k in self.list(key))

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_dir(self, key: str, local_dir: Path) -> None:
        """Upload every file below ``local_dir`` under ``key/``. Raises StoreError."""
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.put_file(_join(key, path.relative_to(local_dir).as_posix()), path)

    def get_dir(self, key: str, local_dir: Path) -> Path:
        """Download everything under ``key/`` into ``local_dir``; returns ``local_dir``.

        Raises MissingInputError if nothing is stored under ``key``.
        """
        key = key.strip("/")
        keys = [k for k in self.list(key) if k != key] if key else self.list()
        if not keys:
            raise MissingInputError(f"nothing stored under {self.child(key).uri}")
        for k in keys:
            rel = k[len(key) :].lstrip("/") if key else k
            target = Path(local_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.get_file(k, target)
        return Path(local_dir)


class LocalStore(Store):
    """A folder on the local filesystem."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        key = _check_key(key)
        return (self.root / key) if key else self.root

    def put_bytes(self, key: str, data: bytes) -> None:
        # Write beside the target and rename: a reader never sees half a file.
        _write_atomically(self._path(key), lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise MissingInputError(f"no such file: {path}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def sha256(self, key: str) -> str:
        # No digest cache here: reading a local file is no download, and (size, mtime)
        # does not name content: cp -p, tar and rsync -t put old mtimes on new bytes,
        # and coarse-clock filesystems (NFS, FAT) miss rewrites within a tick. A stale
        # digest would reuse a result made from other bytes.
        path = self._path(key)
        if not path.is_file():
            raise MissingInputError(f"no such file: {path}")
        try:
            return file_sha256(path)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise MissingInputError(f"no such file: {path}")
        return path.stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [] if base.name.endswith(TMP_SUFFIX) else [_check_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith(TMP_SUFFIX)
        )

    def delete(self, prefix: str) -> None:
        path = self._path(prefix)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        source = Path(path)
        try:
            src = open(source, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {source}: {exc.strerror or exc}") from exc
        with src:
            _write_atomically(self._path(key), lambda fh: shutil.copyfileobj(src, fh))

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise MissingInputError(f"no such file: {source}")
        try:
            data = open(source, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {source}: {exc.strerror or exc}") from exc
        with data:
            _write_atomically(Path(path), lambda fh: shutil.copyfileobj(data, fh))

    def child(self, subpath: str) -> LocalStore:
        return LocalStore(self._path(subpath))

    def local_path(self, key: str = "") -> Path:
        """The filesystem path of ``key`` (local stores only). Raises ConfigError on ``..``."""
        return self._path(key)


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a local file, read in chunks. Raises OSError if unreadable."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_atomically(target: Path, fill) -> None:
    """Write through a temporary file beside ``target``, then rename it into place.

    ``fill(fh)`` writes the content. Raises StoreError; no temporary file survives a failure.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent
        )
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
        # mkstemp makes 0600 files; artifacts should be as readable as any other
        # file this user writes (pods and users that share a volume read them).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """This process's umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere: set and restore (briefly process-wide, so only as the fallback).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# S3 error codes, grouped by what a user can do about them.
_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
_CREDENTIAL_CODES = (
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled",
)
_RETRYABLE_CODES = (
    "500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
    "RequestTimeout", "RequestTimeTooSkewed",
)


class S3Store(Store):
    """``s3://bucket/prefix`` on AWS S3 or any S3-compatible server (MinIO, Ceph, moto)."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        self.bucket = bucket
        self.prefix = _check_key(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _translate(self, exc: BaseException, action: str, key: str) -> TrackbError | None:
        """A one-line trackb error for a boto3 failure; None for anything else (a bug)."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(exc, S3UploadFailedError):
            # boto3's upload_file wraps the real ClientError; judge that one.
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, ClientError):
                exc = inner
            else:
                return StoreError(f"cannot {action} {where}: {exc}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(f"cannot {action} {where}: no usable S3 credentials found "
                              "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        if isinstance(exc, BotoConnectionError | HTTPClientError | RetriesExceededError):
            return UnavailableError(f"cannot {action} {where}: S3 endpoint unreachable ({exc})")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING_CODES:
                return MissingInputError(f"no such object: {where}")
            if code == "NoSuchBucket":
                return StoreError(f"cannot {action} {where}: bucket {self.bucket!r} does not exist")
            if code in _CREDENTIAL_CODES:
                return StoreError(f"cannot {action} {where}: credentials rejected ({code})")
            if code in _RETRYABLE_CODES:
                return UnavailableError(f"cannot {action} {where}: server error ({code})")
            return StoreError(f"cannot {action} {where}: {code} {error.get('Message', '')}".strip())
        if isinstance(exc, BotoCoreError):
            return StoreError(f"cannot {action} {where}: {exc}")
        if isinstance(exc, OSError):  # the local side of an upload or download
            return StoreError(f"cannot {action} {where}: {exc.strerror or exc}")
        return None

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except TrackbError:
            raise
        except Exception as exc:
            error = self._translate(exc, action, key)
            if error is None:
                raise
            raise error from exc

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        import io

        with self._errors("write", key):
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, self._key(key),
                ExtraArgs=_digest_metadata(hashlib.sha256(data).hexdigest()),
                Config=self._transfer_config(),
            )

    def get_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except MissingInputError:
            return False

    def size(self, key: str) -> int:
        with self._errors("read", key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_key(prefix)
        full = self._key(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with self._errors("list", prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            # One pass over everything starting with the name, keeping the exact key and
            # the folder below it: "a/b" must never match "a/bc".
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full if prefix else root):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.endswith("/"):
                        continue  # a "folder marker" some consoles create; not a file
                    if prefix and k != full and not k.startswith(full + "/"):
                        continue
                    keys.append(k[len(root) :])
        return sorted(set(keys))

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        with self._errors("delete", prefix):
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                # DeleteObjects answers 200 even when single keys fail.
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StoreError(
                        f"cannot delete s3://{self.bucket}/{first.get('Key')}: "
                        f"{first.get('Code')} {first.get('Message', '')}".strip()
                        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                    )

    def put_file(self, key: str, path: Path) -> None:
        with self._errors("write", key):
            # Hashed before the upload, not during it: the metadata goes up with the
            # first request (CreateMultipartUpload), and parts are read in parallel.
            digest = file_sha256(Path(path))
            self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs=_digest_metadata(digest),
                Config=self._transfer_config(),
            )

    def sha256(self, key: str) -> str:
        # The S3 ETag is no substitute: it is an MD5, or for a multipart upload an MD5
        # of the parts' MD5s (which depends on the part size), and the manifests record
        # sha256. It does name one version of an object, so it keys the digest cache.
        with self._errors("read", key):
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        # Written by put_*: trusted as the bytes are (whoever can rewrite the metadata
        # can rewrite the content). A PUT or copy that drops it drops it with the bytes.
        recorded = str((head.get("Metadata") or {}).get(SHA256_METADATA, "")).lower()
        if _SHA256_HEX.fullmatch(recorded):
            return recorded
        version = self._version(key, head)
        cached = _cached_digest(version) if version else None
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        with self._errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            for chunk in response["Body"].iter_chunks(HASH_CHUNK):
                digest.update(chunk)
        # Keyed by what GetObject answered: the object may have changed since the HEAD.
        version = self._version(key, response)
        if version:
            _remember_digest(version, digest.hexdigest())
        return digest.hexdigest()

    def _version(self, key: str, response: dict) -> str | None:
        """The digest cache's name for the version of ``key`` a HEAD or GET described;
        None where the server sent no ETag (then nothing tells versions apart)."""
        if not response.get("ETag"):
            return None
        return json.dumps([self.client.meta.endpoint_url, self.bucket, self._key(key),
                           response["ETag"], response.get("ContentLength")])

    def get_file(self, key: str, path: Path) -> None:
        with self._errors("read", key):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # download_file writes a temporary name and renames it: atomic like LocalStore.
            self.client.download_file(
                self.bucket, self._key(key), str(path), Config=self._transfer_config()
            )

    def child(self, subpath: str) -> S3Store:
        return S3Store(self.bucket, self._key(subpath), client=self._client)


def _digest_metadata(digest: str) -> dict:
    """boto3 ExtraArgs recording ``digest`` on the object (x-amz-meta-sha256)."""
    return {"Metadata": {SHA256_METADATA: digest}}


def _digest_cache_path() -> Path | None:
    """Where the digest cache lives; None where there is no cache folder to name (no
    $TRACKB_CACHE and no home directory): then nothing is cached."""
    from trackb_core.corpus import cache_root  # imported late: store stays light

    try:
        return cache_root() / DIGEST_CACHE
    except RuntimeError:  # expanduser("~") without a home directory
        return None


def _load_digests() -> dict[str, str]:
    """The digest cache; empty when missing or unreadable (it is rebuilt, never fatal)."""
    path = _digest_cache_path()
    if path is None:
        return {}
    try:
        digests = json.loads(path.read_text(encoding="utf-8"))["digests"]
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    if not isinstance(digests, dict):
        return {}
    return {k: v for k, v in digests.items()
            if isinstance(k, str) and isinstance(v, str) and _SHA256_HEX.fullmatch(v)}


def _cached_digest(version: str) -> str | None:
    return _load_digests().get(version)


def _remember_digest(version: str, digest: str) -> None:
    """Add one digest to the cache, dropping the oldest past DIGEST_CACHE_ENTRIES.

    Never raises: a cache that cannot be written costs a hash next time, not a run.
    Two processes writing at once may lose one entry, never corrupt the file.
    """
    path = _digest_cache_path()
    if path is None:
        return
    digests = _load_digests()
    digests.pop(version, None)
    digests[version] = digest
    kept = dict(list(digests.items())[-DIGEST_CACHE_ENTRIES:])
    text = json.dumps({"version": 1, "digests": kept}, indent=0)
    try:
        _write_atomically(path, lambda fh: fh.write(text.encode("utf-8")))
    except StoreError:
        pass


def _add_content_md5(request, **_kwargs) -> None:
    """Give DeleteObjects the Content-MD5 header the S3 API says it requires.

    boto3 >= 1.36 sends a CRC32 checksum instead, which MinIO and other S3 look-alikes
    reject with "Missing required header for this request: Content-MD5".
    """
    import base64
    import hashlib

    body = request.body or b""
    if isinstance(body, str):
        body = body.encode("utf-8")
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")


def make_s3_client(max_attempts: int = 5):
    """A boto3 S3 client with settings that work on MinIO and other S3 look-alikes.

    ``max_attempts`` counts the first try: 1 means no retries.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("TRACKB_S3_ENDPOINT_URL") or None
    config = Config(
        s3={"addressing_style": "path"},
        # boto3 >= 1.36 adds CRC checksums by default, which MinIO and others reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    client = boto3.client("s3", endpoint_url=endpoint, config=config)
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


def open_store(uri: str) -> Store:
    """The store for ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    Raises ConfigError for an unsupported scheme, an S3 URI without a bucket, a
    ``file://`` URI naming another host, or a path with ``..`` in an S3 prefix.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"S3 URI has no bucket: {uri!r}")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file URI {uri!r} names host {parsed.netloc!r}; "
                              "use file:///absolute/path or a plain path")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise ConfigError(f"unsupported store URI scheme {parsed.scheme!r} in {uri!r} "
                          "(use a path, file:// or s3://)")
    return LocalStore(uri)


def split_uri(uri: str) -> tuple[str, str]:
    """``("s3://b/a", "c.jsonl")`` for ``"s3://b/a/c.jsonl"``; same for paths."""
    uri = str(uri).rstrip("/")
    head, _, tail = uri.rpartition("/")
    if uri.startswith("s3://") and head.count("/") < 2:
        head = head + "/"
    if not head and uri.startswith("/"):
        head = "/"  # "/c.jsonl" lives in the filesystem root, not the working dir
    return (head or ".", tail)
