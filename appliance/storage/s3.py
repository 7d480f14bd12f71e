"""MinIO or any S3 through the `minio` SDK: the one file that touches it, and where its errors
become storage errors.

Objects of unknown length, or longer than `PART_SIZE`, go up as a multipart upload one part at
a time (memory stays at one part); the SDK aborts the upload if the source fails, so nothing
partial becomes visible. No request checks for the bucket: the first put into a bucket that
does not exist makes it, and until then reads find nothing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from appliance.storage.base import (
    PART_SIZE,
    NotFound,
    ObjectInfo,
    StorageDenied,
    StorageError,
    StorageUnavailable,
    Store,
    announced,
    check_key,
    check_metadata,
    rewind_point,
)

_META = "x-amz-meta-"
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "AccountProblem", "AllAccessDisabled"}
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
         "XMinioServerNotInitialized"}
_BUCKET_TAKEN = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
_READ_BUFFER = 1024 * 1024
_Headers = dict[str, str | list[str] | tuple[str]]


class S3Store(Store):
    """Objects in `bucket` of the server `client` talks to."""

    def __init__(self, client: Minio, bucket: str, *, endpoint: str,
                 http: urllib3.PoolManager | None = None) -> None:
        self.client = client
        self._http = http
        self.bucket = bucket
        self.name = f"s3://{endpoint}/{bucket}"
        self.local = False

    @classmethod
    def connect(cls, endpoint: str, bucket: str, *, access_key: str, secret_key: str,
                secure: bool = True, region: str | None = None, connect_timeout: float = 5.0,
                read_timeout: float = 60.0, retries: int = 2) -> S3Store:
        """A store on the server at `endpoint` (host:port). An unreachable server fails within
        about (retries + 1) × connect_timeout with StorageUnavailable, not the SDK's minutes.
        HTTPS checks the server's certificate against $SSL_CERT_FILE if set, else the system's
        CAs (where a local CA is installed)."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]),
            maxsize=4, cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or None)
        client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                       region=region, http_client=http)
        return cls(client, bucket, endpoint=endpoint, http=http)

    # -- the primitives ---------------------------------------------------------------------
    def put(self, key: str, src: BinaryIO, *, length: int = -1,
            content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> ObjectInfo:
        check_key(key)
        # Prefixed here so that a metadata name like "content-type" stays metadata: the SDK
        # would otherwise send it as the HTTP header of that name.
        headers: _Headers = {
            _META + name: value for name, value in check_metadata(metadata).items()}
        start = rewind_point(src)
        try:
            self._put(key, src, length, content_type, headers, first=True)
        except _NoBucket:
            self._make_bucket()
            if start is None:  # the SDK has already read (part of) it
                raise StorageUnavailable(f"{self.name}: {key}: the bucket did not exist and has now "
                                         "been made: send the object again") from None
            src.seek(start)
            self._put(key, src, length, content_type, headers, first=False)
        return self.stat(key)

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        check_key(key)
        with self._calls(key):
            response = self.client.get_object(self.bucket, key)
        return io.BufferedReader(_Body(self, key, response), _READ_BUFFER)

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        with self._calls(key):
            found = self.client.stat_object(self.bucket, key)
        metadata = {name.lower()[len(_META):]: value for name, value in (found.metadata or {}).items()
                    if name.lower().startswith(_META)}
        return ObjectInfo(key=key, size=found.size or 0, modified=_aware(found.last_modified),
                          etag=found.etag or "",
                          content_type=found.content_type or "application/octet-stream",
                          metadata=metadata)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """In key order, as S3 lists. Content type and metadata are not part of an S3 listing:
        `stat` an object for them."""
        with self._calls(prefix or None), _unless_no_bucket():
            for found in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if found.is_dir or found.object_name is None:
                    continue
                yield ObjectInfo(key=found.object_name, size=found.size or 0,
                                 modified=_aware(found.last_modified), etag=found.etag or "")

    def delete(self, key: str) -> None:
        check_key(key)
        with self._calls(key), _unless_no_bucket():
            self.client.remove_object(self.bucket, key)

    def presigned_get(self, key: str, expires: timedelta) -> str | None:
        """A URL signed with the store's keys (no request is made; S3 allows at most 7 days)."""
        check_key(key)
        with self._calls(key):
            return self.client.presigned_get_object(self.bucket, key, expires=expires)

    def close(self) -> None:
        if self._http is not None:
            self._http.clear()

    # -- the boundary -----------------------------------------------------------------------
    def _put(self, key: str, src: BinaryIO, length: int, content_type: str,
             headers: _Headers, *, first: bool) -> None:
        with self._calls(key):
            try:
                # Up to PART_SIZE in one request, else parts of PART_SIZE one at a time (no
                # parallel uploads): memory stays at one part on a small box.
                self.client.put_object(self.bucket, key, announced(src, length, f"{self.name}: {key}"),
                                       length if length >= 0 else -1, content_type=content_type,
                                       metadata=headers, part_size=PART_SIZE, num_parallel_uploads=1)
            except S3Error as exc:
                if first and exc.code == "NoSuchBucket":
                    raise _NoBucket from None
                raise

    def _make_bucket(self) -> None:
        with self._calls(None):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in _BUCKET_TAKEN:  # made meanwhile by another process
                    raise

    @contextmanager
    def _calls(self, key: str | None) -> Iterator[None]:
        """Calls to the SDK: its exceptions leave as storage errors naming the store and the
        key (never a credential). Other exceptions, a source stream's own, pass unchanged."""
        try:
            yield
        except (MinioException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            raise self.translate(exc, key) from None

    def translate(self, exc: Exception, key: str | None) -> StorageError:
        """The storage error an SDK or network exception means."""
        where = f"{self.name}: {key}" if key else self.name
        if isinstance(exc, S3Error):
            code = exc.code or "error"
            status = exc.response.status if exc.response is not None else 0
            if code in _NOT_FOUND:
                return NotFound(f"{where}: no such object ({code})")
            if code in _DENIED or status == 403:
                return StorageDenied(f"{where}: refused ({code}); check the access and secret keys "
                                     "and what they may do on the bucket")
            if code in _BUSY or status >= 500:
                return StorageUnavailable(f"{where}: the server cannot serve now ({code})")
            return StorageError(f"{where}: {code}: {exc.message or 'refused'}")
        if isinstance(exc, ServerError):
            if exc.status_code >= 500:
                return StorageUnavailable(f"{where}: the server failed (HTTP {exc.status_code})")
            return StorageError(f"{where}: unexpected answer (HTTP {exc.status_code})")
        if isinstance(exc, InvalidResponseError):
            return StorageUnavailable(f"{where}: not an S3 answer; is the endpoint a MinIO or S3 "
                                      f"server? ({str(exc).splitlines()[0][:200]})")
        if isinstance(exc, urllib3.exceptions.MaxRetryError):
            reason = exc.reason if exc.reason is not None else exc
            return StorageUnavailable(f"{where}: cannot reach the server ({_short(reason)})")
        return StorageUnavailable(f"{where}: connection failed ({_short(exc)})")


class _NoBucket(Exception):
    """A first put found no bucket: it is made, and the put tried once more."""


@contextmanager
def _unless_no_bucket() -> Iterator[None]:
    """A bucket not made yet holds nothing: listing it finds nothing, deleting in it is done."""
    try:
        yield
    except S3Error as exc:
        if exc.code != "NoSuchBucket":
            raise


class _Body(io.RawIOBase):
    """An object's bytes as they arrive, with network errors translated mid-read too."""

    def __init__(self, store: S3Store, key: str, response: urllib3.BaseHTTPResponse) -> None:
        self._store, self._key, self._response = store, key, response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        with self._store._calls(self._key):
            data = self._response.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


def _aware(moment: datetime | None) -> datetime:
    if moment is None:
        return datetime.now(UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _short(exc: object) -> str:
    """The gist of a network error: its type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
