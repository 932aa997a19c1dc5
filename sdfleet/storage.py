"""Where images and sidecars go: ``file://DIR`` or ``s3://bucket/prefix`` (any S3 endpoint, e.g. MinIO).

Object keys are derived from the batch id and the job's custom id, so a retried job overwrites its own
object instead of adding a second one.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from sdfleet.errors import StorageError


def object_key(batch_id: str, custom_id: str, suffix: str) -> str:
    return f"{batch_id}/{custom_id}{suffix}"


def staged_key(key: str, run: str) -> str:
    """Where engine run ``run`` writes ``key`` first. The run that owns the job promotes it to ``key`` after
    recording the outcome, so a worker that stalled and lost the job can never overwrite a finished object.
    Hidden (a leading dot), like the partial files of interrupted writes."""
    parent, _, name = key.rpartition("/")
    token = re.sub(r"[^A-Za-z0-9._-]", "_", run)
    return f"{parent}/.run-{token}-{name}" if parent else f".run-{token}-{name}"


# errno values that waiting does not fix: the job fails after a few tries with the storage's own message.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                     errno.EINVAL}
# S3 error codes of the same kind.
_PERMANENT_S3 = {"NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "InvalidBucketName", "AccountProblem", "InvalidObjectState"}


def _s3_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _s3_permanent(exc: BaseException) -> bool:
    return _s3_code(exc) in _PERMANENT_S3


def _file_path(out: str) -> str:
    """The directory of a ``file://`` location. ``file://localhost/DIR`` is RFC 8089's spelling of
    ``file:///DIR``, not the relative directory ``localhost/DIR``."""
    path = out[len("file://"):]
    if path.lower().startswith("localhost/"):
        path = path[len("localhost"):]
    return path


def _resolved(out: str, path: str) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (before Python 3.13)
        raise StorageError(f"{out[:80]!r} cannot be resolved ({exc}); remove the symlink loop or choose "
                           "another directory") from None


def normalize_out(out: str) -> str:
    """Make a ``file://`` location absolute, so workers with another working directory agree on it."""
    if out.startswith("file://"):
        return "file://" + _resolved(out, _file_path(out))
    return out.rstrip("/")


# S3's bucket naming rules (3-63 lower-case letters, digits, '.', '-'; no IP-address look-alikes).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
# Where a file:// location may not point: kernel and device trees take no images.
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")
URL_STYLES = ("s3", "https", "presigned")


def check_location(out: str) -> str:
    """Check a storage location's form (no I/O) and return it; StorageError naming the fix otherwise."""
    fix = "use file://DIR or s3://bucket/prefix"
    if not isinstance(out, str) or any(ord(c) < 32 or ord(c) == 127 for c in out):
        raise StorageError(f"{str(out)[:80]!r} contains control characters; {fix}")
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(f"{out[:80]!a} is not valid UTF-8; {fix} with a UTF-8 name") from None
    if out.startswith("file://"):
        path = _file_path(out)
        if not path:
            raise StorageError(f"{out!r} names no directory; {fix}")
        resolved = _resolved(out, path)
        for d in _SYSTEM_DIRS:
            if resolved == d or resolved.startswith(d + "/"):
                raise StorageError(f"{out[:80]!r} is inside {d}, a system directory that takes no files; "
                                   "choose a directory of your own, e.g. file://./outputs")
        return out
    if out.startswith("s3://"):
        bucket, _, prefix = out[len("s3://"):].partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP_LIKE.fullmatch(bucket):
            raise StorageError(f"{bucket[:70]!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, "
                               "'.' or '-', starting and ending with a letter or digit); e.g. s3://my-images/run1")
        if any(p in (".", "..") for p in prefix.split("/")):
            raise StorageError(f"{out[:80]!r}: the prefix may not contain '.' or '..' parts; e.g. s3://bucket/run1")
        return out
    raise StorageError(f"{out[:80]!r} is not a storage location; {fix}")


class Storage(ABC):
    location: str

    @abstractmethod
    def promote(self, staged: str, key: str) -> None:
        """Make the object at ``staged`` the object at ``key`` (atomically where the store allows); a no-op
        when ``staged`` is gone and ``key`` exists (promoted already)."""

    @abstractmethod
    def discard(self, key: str) -> None:
        """Delete ``key`` if it exists."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store ``data`` under ``key``; return its URL. Raises StorageError when it could not be stored."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError with a fix if this location cannot be written (checked at submit time)."""

    @abstractmethod
    def url(self, key: str) -> str: ...


class FileStorage(Storage):
    def __init__(self, location: str):
        self.location = normalize_out(location)
        self.root = Path(self.location[len("file://"):])
        self._made: set[str] = set()

    def _path(self, key: str) -> str:
        # Keys are built from validated ids; refuse anything that could still climb out of the root.
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StorageError(f"object key {key!r} escapes {self.root}")
        return os.path.join(self.root, key)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        parent, name = os.path.split(path)
        try:
            if parent not in self._made:
                os.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            # Write then rename: a reader never sees half an image, and a retry simply replaces it.
            # os-level calls: a file object costs three more system calls (fstat, ioctl, lseek) per write.
            tmp = f"{parent}/.tmp-{os.getpid()}-{threading.get_ident()}-{name}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except OSError:
                # A full disk or a vanished directory: leave no partial file behind.
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            self._made.discard(parent)
            raise StorageError(f"cannot write {path}: {exc}", permanent=exc.errno in _PERMANENT_ERRNOS) from exc
        return self.url(key)

    def promote(self, staged: str, key: str) -> None:
        src, dst = self._path(staged), self._path(key)
        try:
            os.replace(src, dst)  # atomic on one file system: a reader sees the old object or the new one
        except FileNotFoundError:
            if not os.path.isfile(dst):
                raise StorageError(f"cannot promote {src}: it is gone and {dst} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot promote {src} to {dst}: {exc}",
                               permanent=exc.errno in _PERMANENT_ERRNOS) from exc

    def discard(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {self._path(key)}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def get(self, key: str) -> bytes:
        try:
            return Path(self._path(key)).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        # Hidden names are partial writes (.tmp-*) and staged objects of engine runs (.run-*), never results.
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".tmp-check-"):
                pass
        except OSError as exc:
            raise StorageError(f"--out {self.location}: cannot write there ({exc.strerror}); choose a writable directory") from None

    def url(self, key: str) -> str:
        return "file://" + os.path.join(self.root, key)


_RETRYABLE = (ConnectionError, TimeoutError, OSError)


class S3Storage(Storage):
    def __init__(self, location: str, *, endpoint_url: str | None = None, region: str = "us-east-1", retries: int = 8):
        import boto3
        from botocore.config import Config

        self.location = location.rstrip("/")
        parsed = urlparse(self.location)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.lstrip("/")
        self.endpoint_url = endpoint_url
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )
        self._retry = retry(
            reraise=True, stop=stop_after_attempt(retries + 1),
            wait=wait_exponential_jitter(initial=0.2, max=10),
            # An error that waiting cannot fix goes straight to the caller (which fails the job after a few tries).
            retry=retry_if_exception(lambda exc: not _s3_permanent(exc)),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> str:
        def _put() -> None:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

        try:
            self._retry(_put)()
        except Exception as exc:  # botocore raises many unrelated classes; all mean "not stored"
            raise StorageError(f"cannot store s3://{self.bucket}/{self._key(key)}: {exc}",
                               permanent=_s3_permanent(exc)) from exc
        return self.url(key)

    def promote(self, staged: str, key: str) -> None:
        # S3 has no rename: a server-side copy, then the staged object is deleted. A reader sees the old object
        # or the whole new one (S3 PUT/COPY are atomic per object).
        src, dst = self._key(staged), self._key(key)

        def _copy() -> None:
            self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})

        try:
            self._retry(_copy)()
        except Exception as exc:
            if _s3_code(exc) in ("NoSuchKey", "404") and self.exists(key):
                return  # promoted already by an earlier attempt
            raise StorageError(f"cannot promote s3://{self.bucket}/{src}: {exc}", permanent=_s3_permanent(exc)) from exc
        self.discard(staged)

    def discard(self, key: str) -> None:
        try:
            self._retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))()
        except Exception as exc:
            raise StorageError(f"cannot delete s3://{self.bucket}/{self._key(key)}: {exc}",
                               permanent=_s3_permanent(exc)) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            raise StorageError(f"cannot read s3://{self.bucket}/{self._key(key)}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.rsplit("/", 1)[-1].startswith("."):  # staged objects of engine runs, never results
                    continue
                out.append(k[len(self.prefix) + 1:] if self.prefix else k)
        return sorted(out)

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            raise StorageError(
                f"--out {self.location}: bucket '{self.bucket}' is not reachable{where} ({exc}); "
                "create the bucket, check credentials, or set SDFLEET_S3_ENDPOINT_URL"
            ) from None

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


@dataclass
class StorageFactory:
    """Builds (and caches) one Storage per location, with the endpoint settings applied."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    retries: int = 8

    def __post_init__(self) -> None:
        self._cache: dict[str, Storage] = {}

    def _presigner(self):
        # SigV4 (X-Amz-Signature, at most 7 days): what every S3 region and MinIO accept; botocore would
        # otherwise presign some endpoints with the legacy scheme.
        if getattr(self, "_presign_client", None) is None:
            import boto3
            from botocore.config import Config

            self._presign_client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                                config=Config(signature_version="s3v4"))
        return self._presign_client

    def public_url(self, url: str | None, style: str = "s3", ttl_s: int = 7 * 24 * 3600) -> str | None:
        """``url`` (as a worker recorded it) in the batch's URL style, for manifests and webhooks.

        ``s3``: as recorded (s3://bucket/key). ``https``: the object's HTTPS address (path style at a custom
        endpoint, virtual-host style on AWS), for public or CDN-fronted buckets. ``presigned``: an HTTPS URL
        anyone can GET for ``ttl_s`` seconds, signed locally with this process's credentials.
        file:// URLs are returned as they are in every style.
        """
        if not url or not url.startswith("s3://") or style == "s3":
            return url
        bucket, _, key = url[len("s3://"):].partition("/")
        if style == "https":
            if self.endpoint_url:
                return f"{self.endpoint_url.rstrip('/')}/{bucket}/{quote(key)}"
            if "." in bucket:
                # AWS's certificate *.s3.REGION.amazonaws.com covers one label: a dotted bucket's virtual host
                # fails every TLS check, so it is addressed path style.
                return f"https://s3.{self.region}.amazonaws.com/{bucket}/{quote(key)}"
            return f"https://{bucket}.s3.{self.region}.amazonaws.com/{quote(key)}"
        if style == "presigned":
            from botocore.exceptions import NoCredentialsError, PartialCredentialsError

            try:
                return self._presigner().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                                ExpiresIn=int(ttl_s))
            except (NoCredentialsError, PartialCredentialsError):
                raise StorageError("presigned URLs are signed with S3 credentials, and none are configured here; "
                                   "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile), or use "
                                   "--url-style https or s3") from None
        raise StorageError(f"unknown URL style {style!r}; use one of {', '.join(URL_STYLES)}")

    def get(self, location: str) -> Storage:
        if location not in self._cache:
            if location.startswith("file://"):
                self._cache[location] = FileStorage(location)
            elif location.startswith("s3://"):
                self._cache[location] = S3Storage(location, endpoint_url=self.endpoint_url, region=self.region,
                                                  retries=self.retries)
            else:
                raise StorageError(f"unsupported location {location!r}; use file://DIR or s3://bucket/prefix")
        return self._cache[location]
