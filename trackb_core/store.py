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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlparse

from trackb_core.errors import MissingInputError, StoreError, UnavailableError

# Objects above this size go up in parts; S3's minimum part size is 5 MiB.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
# Local writes go to a temporary name first; listings never show these.
TMP_SUFFIX = ".trackb-tmp"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


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
    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), sorted, relative to this store."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete ``prefix`` itself and everything under it. Missing is not an error."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file to ``key`` (multipart when large)."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` to a local file. Raises MissingInputError if absent."""

    @abstractmethod
    def child(self, subpath: str) -> Store:
        """The same store narrowed to ``subpath``."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StoreError now, with the reason, if this store cannot be written."""

    def is_dir(self, key: str) -> bool:
        """True if anything is stored under ``key/``."""
        return bool(self.list(key))

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_dir(self, key: str, local_dir: Path) -> None:
        """Upload every file below ``local_dir`` under ``key/``."""
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.put_file(_join(key, path.relative_to(local_dir).as_posix()), path)

    def get_dir(self, key: str, local_dir: Path) -> Path:
        """Download everything under ``key/`` into ``local_dir``; returns ``local_dir``.

        Raises MissingInputError if nothing is stored under ``key``.
        """
        keys = self.list(key)
        if not keys:
            raise MissingInputError(f"nothing stored under {self.child(key).uri}")
        for k in keys:
            rel = k[len(key.strip("/")) :].lstrip("/") if key.strip("/") else k
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
        key = key.strip("/")
        path = (self.root / key) if key else self.root
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise MissingInputError(f"no such file: {path}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix.strip("/")]
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
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        except OSError as exc:
            raise StoreError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise MissingInputError(f"no such file: {source}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def child(self, subpath: str) -> LocalStore:
        return LocalStore(self._path(subpath))

    def check_writable(self) -> None:
        probe = ".trackb-write-probe"
        self.put_bytes(probe, b"")
        self.delete(probe)

    def local_path(self, key: str = "") -> Path:
        """The filesystem path of ``key`` (local stores only)."""
        return self._path(key)


class S3Store(Store):
    """``s3://bucket/prefix`` on AWS S3 or any S3-compatible server (MinIO, Ceph, moto)."""

    def __init__(self, bucket: str, prefix: str = "", client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = make_s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _fail(self, exc: Exception, action: str, key: str) -> Exception:
        """Translate a boto3 failure into a one-line trackb error."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(exc, NoCredentialsError):
            return StoreError(f"cannot {action} {where}: no S3 credentials found "
                              "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        if isinstance(exc, EndpointConnectionError):
            return UnavailableError(f"cannot {action} {where}: S3 endpoint unreachable ({exc})")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return MissingInputError(f"no such object: {where}")
            if code == "NoSuchBucket":
                return StoreError(f"cannot {action} {where}: bucket {self.bucket!r} does not exist")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                return StoreError(f"cannot {action} {where}: credentials rejected ({code})")
            return StoreError(f"cannot {action} {where}: {code or exc}")
        return UnavailableError(f"cannot {action} {where}: {exc}")

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        import io

        try:
            self.client.upload_fileobj(
                io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer_config()
            )
        except Exception as exc:  # noqa: BLE001 - translated into a named error
            raise self._fail(exc, "write", key) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "read", key) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(exc, "read", key) from exc
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "read", key) from exc

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            # An exact key, or a folder: never match "a/bc" when asked for "a/b".
            for search in ([full, full + "/"] if full else [""]):
                for page in paginator.paginate(Bucket=self.bucket, Prefix=search):
                    for obj in page.get("Contents", []):
                        k = obj["Key"]
                        if search == full and full and k != full:
                            continue
                        keys.append(k)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "list", prefix) from exc
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted({k[strip:] for k in keys})

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix)
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "delete", prefix) from exc

    def put_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(
                str(path), self.bucket, self._key(key), Config=self._transfer_config()
            )
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "write", key) from exc

    def get_file(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(
                self.bucket, self._key(key), str(path), Config=self._transfer_config()
            )
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, "read", key) from exc

    def child(self, subpath: str) -> S3Store:
        return S3Store(self.bucket, self._key(subpath), client=self._client)

    def check_writable(self) -> None:
        probe = ".trackb-write-probe"
        self.put_bytes(probe, b"")
        self.delete(probe)


def make_s3_client():
    """A boto3 S3 client with settings that work on MinIO and other S3 look-alikes."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("TRACKB_S3_ENDPOINT_URL") or None
    config = Config(
        s3={"addressing_style": "path"},
        # boto3 >= 1.36 adds CRC checksums by default, which MinIO and others reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def open_store(uri: str) -> Store:
    """The store for ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain path.

    Raises ConfigError for an unsupported scheme.
    """
    from trackb_core.errors import ConfigError

    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"S3 URI has no bucket: {uri!r}")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
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
    return (head or ".", tail)
