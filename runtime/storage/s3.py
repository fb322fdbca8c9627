"""A :class:`runtime.storage.BlobStore` on any S3-compatible object store (AWS, MinIO, R2,
Ceph, SeaweedFS), through boto3.

The endpoint and the credentials come from the standard variables (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), read by
boto3 itself, so pointing the runtime at another store needs nothing from us.

Object layout under ``s3://<bucket>/<prefix>/``::

    chunks/<key[:2]>/<key>.kvsnap                      blobs (content-addressed)
    manifests/<session>/<generation>.kvman             manifests
    quarantine/chunks/<key>.kvsnap.<ns>                damaged blobs moved aside
    quarantine/manifests/<session>/<generation>.kvman.<ns>
                                                       damaged manifests moved aside

Guarantees (those of the protocol): an S3 PUT is atomic per object and durable when it
returns (read-after-write consistent on every store named above), so :meth:`put_all`
and :meth:`switch_manifest` are durable on return and a reader sees a whole object or none.
A chunk is put with ``If-None-Match: *`` where the store supports it (a concurrent writer of
the same key cannot replace it), and with a HEAD then PUT where it does not; either way the
key names the content, so a second put writes the same bytes. The quarantine reason travels in
the moved object's metadata (``x-amz-meta-reason``).

A store that cannot be reached (no connection, a timeout, a 5xx answer after boto3's own
retries) raises :class:`runtime.errors.PersistError`, naming the store and saying to retry;
nothing else is taken for that, so a missing object stays ``FileNotFoundError`` and a refused
request stays boto3's error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from runtime.errors import ArgumentError, ClosedError, PersistError, ReadOnlyError
from runtime.layout import validate_session_id
from runtime.storage.local import CHUNK_SUFFIX, MANIFEST_SUFFIX

logger = logging.getLogger(__name__)

__all__ = ["S3BlobStore", "parse_s3_url"]

#: PUTs in flight at once in :meth:`S3BlobStore.put_all`, and chunks read ahead of a
#: restore: each waits on a round trip, not on a core, and at most this many chunks' bytes
#: are in memory.
IN_FLIGHT = 4

_KEY_RE = re.compile(r"[0-9a-f]{32}")
_GEN_RE = re.compile(r"(\d{12})" + re.escape(MANIFEST_SUFFIX))
#: S3's DeleteObjects takes at most this many keys a call.
_DELETE_BATCH = 1000


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")`` (the prefix may be empty)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ArgumentError(f"not an s3://bucket/prefix URL: {url!r}")
    return parts.netloc, parts.path.strip("/")


def _error_code(exc: Exception) -> str:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(code or status)


def _is_missing(exc: Exception) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound"}


def _is_unavailable(exc: Exception) -> bool:
    """Whether ``exc`` says the store is away (no connection, a timeout, a 5xx), rather than
    that it refused the request."""
    from botocore.exceptions import ConnectionError as NoConnection
    from botocore.exceptions import HTTPClientError

    if isinstance(exc, NoConnection | HTTPClientError):
        return True
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return isinstance(status, int) and status >= 500


class S3BlobStore:
    """A :class:`runtime.storage.BlobStore` in an S3 bucket, under a prefix.

    Args:
        url: ``s3://bucket/prefix``.
        readonly: refuse every write.
        client: a boto3 S3 client (default: one made from the standard AWS variables).
    """

    def __init__(self, url: str, *, readonly: bool = False, client: Any = None) -> None:
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.readonly = readonly
        self._closed = False
        if client is None:
            try:
                import boto3  # the cluster extra; imported only when S3 is used
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(
                    "an s3:// store needs the cluster extra: pip install '.[cluster]'"
                ) from exc

            client = boto3.client("s3")
        self._s3 = client
        #: Whether the store honours ``If-None-Match: *`` on PUT (cleared on its first refusal).
        self._conditional_put = True
        self.fetch_ahead = IN_FLIGHT
        self._senders: concurrent.futures.ThreadPoolExecutor | None = None
        self._senders_lock = threading.Lock()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse later writes and join the PUT workers; safe to call twice."""
        self._closed = True
        with self._senders_lock:
            senders, self._senders = self._senders, None
        if senders is not None:
            senders.shutdown(wait=True)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _require_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"chunk store {self.describe_root()} was opened read-only")
        if self._closed:
            raise ClosedError(f"chunk store {self.describe_root()} is closed")

    def describe_root(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @contextlib.contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        """Run requests; a store that cannot be reached raises :class:`PersistError`."""
        try:
            yield
        except Exception as exc:
            if not _is_unavailable(exc):
                raise
            raise PersistError(
                f"the object store {self.describe_root()} is unavailable ({what}: {exc}); "
                "nothing was stored or read; retry"
            ) from exc

    # -- layout ---------------------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The object key of blob ``key``."""
        if not _KEY_RE.fullmatch(key):
            raise ArgumentError(f"not a chunk key: {key!r}")
        return f"{self.prefix}chunks/{key[:2]}/{key}{CHUNK_SUFFIX}"

    def _session_prefix(self, session_id: str) -> str:
        return f"{self.prefix}manifests/{validate_session_id(session_id)}/"

    def manifest_key(self, session_id: str, generation: int) -> str:
        """The object key of manifest ``generation`` of the session."""
        return f"{self._session_prefix(session_id)}{generation:012d}{MANIFEST_SUFFIX}"

    def _list(self, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
        paginator = self._s3.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._reaching(f"LIST {prefix}"):
            yield from paginator.paginate(**kwargs)

    # -- blobs ----------------------------------------------------------------------------------

    def _size(self, object_key: str) -> int | None:
        with self._reaching(f"HEAD {object_key}"):
            try:
                head = self._s3.head_object(Bucket=self.bucket, Key=object_key)
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise
        return int(head["ContentLength"])

    def put_all(self, blobs: Sequence[tuple[str, Callable[[BinaryIO], int]]]) -> list[int]:
        """PUT each blob unless it is there; durable on return (every PUT has returned).
        Returns the stored sizes.

        The keys are HEADed first, :data:`IN_FLIGHT` at once (a stored one is not encoded
        again); then each missing blob is encoded on the caller's thread, in order, and sent
        by a worker, up to :data:`IN_FLIGHT` at once, with ``If-None-Match: *`` where the
        store honours it. On a failure the PUTs in flight are waited for, then the first
        error raised: what was stored is complete.
        """
        self._require_writable()
        object_keys = [self.object_key(key) for key, _ in blobs]
        found = list(self._workers().map(self._size, object_keys))
        sent: list[concurrent.futures.Future[int]] = []
        try:
            for (_, write), object_key, existing in zip(blobs, object_keys, found, strict=True):
                if existing is not None:
                    sent.append(_done(existing))
                    continue
                while sum(not f.done() for f in sent) >= IN_FLIGHT:
                    concurrent.futures.wait(sent, return_when=concurrent.futures.FIRST_COMPLETED)
                if any(f.done() and f.exception() is not None for f in sent):
                    break  # raised below, once the others are in
                buf = io.BytesIO()
                size = write(buf)
                sent.append(self._workers().submit(self._send, object_key, buf.getvalue(), size))
        finally:
            concurrent.futures.wait(sent)
        return [f.result() for f in sent]

    def _workers(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._senders_lock:
            if self._senders is None:
                self._senders = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, "s3put")
            return self._senders

    def _send(self, object_key: str, body: bytes, size: int) -> int:
        """PUT one encoded blob; its stored size."""
        if not self._put_new(object_key, body):
            # another writer stored the same key (the same content) first
            return self._size(object_key) or size
        return size

    def _put_new(self, object_key: str, body: bytes) -> bool:
        """PUT an object that must not exist: ``If-None-Match: *`` where the store supports
        it, a plain PUT after the caller's HEAD where it does not (then racy); False when
        another writer's object is there."""
        with self._reaching(f"PUT {object_key}"):
            if self._conditional_put:
                try:
                    self._s3.put_object(
                        Bucket=self.bucket, Key=object_key, Body=body, IfNoneMatch="*"
                    )
                    return True
                except Exception as exc:
                    code = _error_code(exc)
                    if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                        return False
                    if code not in {"NotImplemented", "501", "InvalidArgument", "400"}:
                        raise
                    logger.info("%s refuses If-None-Match; HEAD then PUT", self.describe_root())
                    self._conditional_put = False
            self._s3.put_object(Bucket=self.bucket, Key=object_key, Body=body)
            return True

    def get(self, key: str) -> memoryview:
        """The blob's bytes (read whole: an object store has nothing to map)."""
        object_key = self.object_key(key)
        with self._reaching(f"GET {object_key}"):
            try:
                got = self._s3.get_object(Bucket=self.bucket, Key=object_key)
            except Exception as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(self.describe(key)) from exc
                raise
            return memoryview(got["Body"].read())

    def has(self, key: str) -> bool:
        """Whether blob ``key`` is stored (a HEAD)."""
        return self._size(self.object_key(key)) is not None

    def describe(self, key: str) -> str:
        """The blob's ``s3://`` URL."""
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def describe_manifest(self, session_id: str, generation: int) -> str:
        """The manifest's ``s3://`` URL."""
        return f"s3://{self.bucket}/{self.manifest_key(session_id, generation)}"

    def list_keys(self) -> Iterator[str]:
        """Every stored blob key (strays skipped)."""
        for page in self._list(f"{self.prefix}chunks/"):
            for obj in page.get("Contents", []):
                name = str(obj["Key"]).rsplit("/", 1)[-1]
                key = name[: -len(CHUNK_SUFFIX)] if name.endswith(CHUNK_SUFFIX) else ""
                if _KEY_RE.fullmatch(key):
                    yield key

    def delete(self, key: str) -> None:
        """Delete blob ``key`` (durable on return; absent is not an error)."""
        self._require_writable()
        object_key = self.object_key(key)
        with self._reaching(f"DELETE {object_key}"):
            self._s3.delete_object(Bucket=self.bucket, Key=object_key)

    def sync_deletes(self, keys: Collection[str]) -> None:
        """Nothing to do: an S3 DELETE is durable when it returns."""

    def _move_aside(self, source: str, target: str, reason: str) -> bool:
        with self._reaching(f"COPY {source}"):
            try:
                self._s3.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    Metadata={"reason": reason.encode("ascii", "replace").decode()[:1024]},
                    MetadataDirective="REPLACE",
                )
            except Exception as exc:
                if _is_missing(exc):
                    return False
                raise
            self._s3.delete_object(Bucket=self.bucket, Key=source)
        return True

    def quarantine(self, key: str, reason: str) -> None:
        """Copy blob ``key`` to ``quarantine/chunks/`` with ``reason``, then delete it."""
        if self.readonly or self._closed:
            return
        target = f"{self.prefix}quarantine/chunks/{key}{CHUNK_SUFFIX}.{time.time_ns()}"
        if self._move_aside(self.object_key(key), target, reason):
            logger.warning("quarantined %s: %s", self.describe(key), reason)

    # -- manifests ------------------------------------------------------------------------------

    def sessions(self) -> list[str]:
        """The sessions with at least one manifest object, sorted. Listed from the objects
        themselves, not from common prefixes: a filer-backed store (SeaweedFS) keeps an empty
        "directory" after its last object is deleted."""
        out: set[str] = set()
        base = f"{self.prefix}manifests/"
        for page in self._list(base):
            for obj in page.get("Contents", []):
                session, _, name = str(obj["Key"])[len(base) :].partition("/")
                if not _GEN_RE.fullmatch(name):
                    continue
                try:
                    out.add(validate_session_id(session))
                except ValueError:
                    continue
        return sorted(out)

    def generations(self, session_id: str) -> list[int]:
        """The session's manifest generations, newest first."""
        found = []
        for page in self._list(self._session_prefix(session_id), delimiter="/"):
            for obj in page.get("Contents", []):
                match = _GEN_RE.fullmatch(str(obj["Key"]).rsplit("/", 1)[-1])
                if match:
                    found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def get_manifest(self, session_id: str, generation: int, max_size: int) -> bytes:
        """The manifest's bytes, its size checked against ``max_size`` before reading."""
        object_key = self.manifest_key(session_id, generation)
        with self._reaching(f"GET {object_key}"):
            try:
                got = self._s3.get_object(Bucket=self.bucket, Key=object_key)
            except Exception as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(self.describe_manifest(session_id, generation)) from exc
                raise
            body = got["Body"]
            size = int(got["ContentLength"])
            if size > max_size:
                body.close()
                raise ValueError(f"{size} bytes is too large")
            data: bytes = body.read()
        return data

    def switch_manifest(self, session_id: str, generation: int, data: bytes) -> None:
        """One PUT of the manifest under its generation's key: atomic per object, durable on
        return. The caller has put every chunk it names first."""
        self._require_writable()
        object_key = self.manifest_key(session_id, generation)
        with self._reaching(f"PUT {object_key}"):
            self._s3.put_object(Bucket=self.bucket, Key=object_key, Body=data)

    def create_manifest(self, session_id: str, generation: int, data: bytes) -> bool:
        """PUT the manifest only if no object holds its generation yet (``If-None-Match: *``;
        a HEAD first where the store refuses conditional writes, which leaves a race); False
        when one does: a manifest of another writer is never replaced."""
        self._require_writable()
        key = self.manifest_key(session_id, generation)
        return self._size(key) is None and self._put_new(key, data)

    def delete_manifest(self, session_id: str, generation: int) -> None:
        """Delete one manifest (absent is not an error)."""
        self._require_writable()
        object_key = self.manifest_key(session_id, generation)
        with self._reaching(f"DELETE {object_key}"):
            self._s3.delete_object(Bucket=self.bucket, Key=object_key)

    def quarantine_manifest(self, session_id: str, generation: int, reason: str) -> None:
        """Copy the manifest to ``quarantine/manifests/<session>/`` with ``reason``, then delete
        it."""
        if self.readonly or self._closed:
            return
        source = self.manifest_key(session_id, generation)
        name = source.rsplit("/", 1)[-1]
        target = f"{self.prefix}quarantine/manifests/{session_id}/{name}.{time.time_ns()}"
        if self._move_aside(source, target, reason):
            logger.warning(
                "quarantined %s: %s", self.describe_manifest(session_id, generation), reason
            )

    def delete_session(self, session_id: str) -> None:
        """Delete every manifest object of the session."""
        self._require_writable()
        keys = [
            str(obj["Key"])
            for page in self._list(self._session_prefix(session_id))
            for obj in page.get("Contents", [])
        ]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[i : i + _DELETE_BATCH]]
            with self._reaching(f"DELETE {len(batch)} manifests of {session_id}"):
                self._s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )


def _done(value: int) -> concurrent.futures.Future[int]:
    """A future that already holds ``value``."""
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.set_result(value)
    return future
