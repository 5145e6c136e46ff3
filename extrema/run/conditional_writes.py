"""Conditional writes on S3 and the stores that speak its API, for the stage lease. Torch-free.

`create` writes an object only if none exists (`If-None-Match: *`), `replace` only while the object is still the
version read (`If-Match: <ETag>`), `read` returns a body together with the ETag of that same version. They call
s3fs's aiobotocore client directly: s3fs has no API for `If-Match`, and its `"x"` mode sends `If-None-Match`
only for non-empty files and only in recent versions. A write whose response was lost and that s3fs sent again
meets its own first try as "precondition failed": the object is read back, and a body equal to ours counts as
written. s3fs silently drops the parameters its botocore does not know (botocore learnt IfNoneMatch and IfMatch
on PutObject in late 2024): a client that would drop them raises Unsupported instead of writing unconditionally.
`probe` tells whether a store honours both preconditions (some S3-compatible stores ignore them).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.asyn import sync

S3_PROTOCOLS = ("s3", "s3a")
LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")


class Unsupported(RuntimeError):
    """This client cannot send a conditional write (its botocore predates the parameter)."""


def speaks_s3(fs: AbstractFileSystem) -> bool:
    """Whether `fs` is s3fs (or built on it), whose client takes S3's conditional headers."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool(set(protocols) & set(S3_PROTOCOLS)) and callable(getattr(fs, "call_s3", None))


def _store_code(error: BaseException) -> str | None:
    """The S3 error code (or HTTP status) behind an exception s3fs raised, from the chain of causes."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(code or status)
        e = e.__cause__ or e.__context__
    return None


def _lost(error: BaseException) -> bool:
    return _store_code(error) in LOST


async def _get(fs: Any, bucket: str, key: str, limit: int) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        data = await body.read(limit)
    finally:
        body.close()
    return data, str(response["ETag"])


def read(fs: Any, path: str, limit: int) -> tuple[bytes, str] | None:
    """The first `limit` bytes of an object and the ETag of that version; None when there is no object."""
    bucket, key, _ = fs.split_path(path)
    try:
        return sync(fs.loop, _get, fs, bucket, key, limit)
    except FileNotFoundError:
        return None
    except OSError as e:
        if _store_code(e) in ("NoSuchKey", "404"):
            return None
        raise


def _put(fs: Any, path: str, data: bytes, condition: dict[str, str]) -> str | None:
    takes = fs.s3.meta.service_model.operation_model("PutObject").input_shape.members
    for name in condition:
        if name not in takes:
            import botocore

            raise Unsupported(f"botocore {botocore.__version__} cannot send {name} with PutObject: upgrade botocore")
    bucket, key, _ = fs.split_path(path)
    try:
        out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as e:
        if not _lost(e):
            raise
        now = read(fs, path, len(data) + 1)
        return now[1] if now is not None and now[0] == data else None
    finally:
        fs.invalidate_cache(path)
    return str(out["ETag"])


def create(fs: Any, path: str, data: bytes) -> str | None:
    """Write a non-empty object only if none exists at `path`: its ETag, or None when another write got there first."""
    if not data:
        raise ValueError("S3 takes If-None-Match only with a body: an exclusive create needs non-empty data")
    return _put(fs, path, data, {"IfNoneMatch": "*"})


def replace(fs: Any, path: str, data: bytes, etag: str) -> str | None:
    """Overwrite the object only while its ETag is still `etag`: the new ETag, or None when it changed or is gone."""
    return _put(fs, path, data, {"IfMatch": etag})


def probe(fs: Any, folder: str) -> str | None:
    """Why the store under `folder` cannot be trusted with conditional writes, or None when it honours them: two
    conflicting creates of one probe object must have exactly one winner, and a replace with a stale ETag must
    fail. The probe object is removed."""
    path = f"{folder.rstrip('/')}/.conditional-write-probe-{uuid.uuid4().hex}"
    try:
        first = create(fs, path, b"first\n")
        second = create(fs, path, b"second\n")
        if (first is None) == (second is None):
            winners = "both" if first is not None else "neither"
            return f"two exclusive creates (If-None-Match: *) of one object: {winners} succeeded, not exactly one"
        etag = first or second
        assert etag is not None
        if replace(fs, path, b"third\n", etag) is None:
            return "a replace with the object's current ETag (If-Match) was refused"
        if replace(fs, path, b"fourth\n", etag) is not None:
            return "a replace with a stale ETag (If-Match) succeeded: the store ignores If-Match"
        return None
    except Unsupported as e:
        return str(e)
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(path)
