"""Reaching datasets on object stores: fsspec options from a StorageSpec and the environment, one filesystem per
process (s3fs is not fork-safe), and errors that say what is wrong. Torch-free; holds and writes no secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import split_protocol, url_to_fs

from extrema.spec import StorageSpec

S3_PROTOCOLS = ("s3", "s3a")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class DataSourceError(RuntimeError):
    """A dataset URL that cannot be read: missing bucket or path, no or wrong credentials, unreachable endpoint."""


def endpoint(storage: StorageSpec | None) -> str | None:
    """The S3 endpoint in use: the spec's, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; None for AWS itself."""
    if storage is not None and storage.endpoint_url:
        return storage.endpoint_url
    return next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)


def storage_options(url: str, storage: StorageSpec | None) -> dict[str, Any]:
    """fsspec keyword arguments for `url` (empty except for s3://); secrets are read from the environment here."""
    if split_protocol(url)[0] not in S3_PROTOCOLS:
        return {}
    s = storage or StorageSpec()
    opts: dict[str, Any] = {
        "skip_instance_cache": True,  # credentials are resolved when a filesystem is made: never reuse another's
        # s3fs retries a failed request itself (ProcessFs sets how often); botocore tries each attempt once
        "config_kwargs": {"connect_timeout": s.connect_timeout_s, "retries": {"max_attempts": 1}},
    }
    url_endpoint = endpoint(s)
    if url_endpoint:
        opts["endpoint_url"] = url_endpoint
    if s.region:
        opts["client_kwargs"] = {"region_name": s.region}
    if s.profile:
        opts["profile"] = s.profile
    if s.anon:
        opts["anon"] = True
    if s.key_env and s.secret_env:
        missing = [v for v in (s.key_env, s.secret_env) if not os.environ.get(v)]
        if missing:
            raise DataSourceError(
                f"no credentials for {url}: data.storage names the environment variable(s) {', '.join(missing)}, "
                "which are not set in this process"
            )
        opts["key"], opts["secret"] = os.environ[s.key_env], os.environ[s.secret_env]
    return opts


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes and contexts, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def access_error(exc: BaseException, url: str, storage: StorageSpec | None) -> DataSourceError:
    """A DataSourceError saying in one line why `url` could not be read (bucket, credentials, endpoint)."""
    names = {type(e).__name__ for e in chain(exc)}
    text = " ".join(str(e) for e in chain(exc)).lower()
    if names & {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"}:
        why = (
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or name the variables "
            "in data.storage.key_env / secret_env"
        )
    elif names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"}:
        why = "the endpoint cannot be reached (wrong endpoint_url, or the store is down)"
    elif "bucket does not exist" in text or "nosuchbucket" in text:
        why = "the bucket does not exist"
    elif any(isinstance(e, PermissionError) for e in chain(exc)) or "access denied" in text or "forbidden" in text:
        why = "access denied (wrong credentials, or no permission on this bucket)"
    elif any(isinstance(e, FileNotFoundError) for e in chain(exc)):
        why = f"not found ({exc})"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return DataSourceError(f"cannot read {where(url, storage)}: {why}")


def where(url: str, storage: StorageSpec | None) -> str:
    """The URL, with the endpoint it is read from when it is on S3."""
    return f"{url} (endpoint {endpoint(storage) or 'the default'})" if split_protocol(url)[0] in S3_PROTOCOLS else url


def missing_bucket(fs: AbstractFileSystem, url: str, storage: StorageSpec | None) -> DataSourceError | None:
    """For an s3:// URL whose bucket does not exist, the error that says so; None otherwise."""
    protocol, path = split_protocol(url)
    bucket = (path or "").split("/", 1)[0]
    if protocol not in S3_PROTOCOLS or not bucket:
        return None
    try:
        if fs.exists(bucket):
            return None
    except Exception:  # the original error is the better one
        return None
    return DataSourceError(f"cannot read {where(url, storage)}: the bucket {bucket!r} does not exist")


class ProcessFs:
    """A URL's filesystem, made again in each process that uses it (each loader worker is a process of its own)."""

    def __init__(self, url: str, storage: StorageSpec | None = None) -> None:
        self.url, self.storage = url, storage
        self._pid: int | None = None
        self._fs: AbstractFileSystem | None = None
        self.path = ""
        self.get()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage": self.storage, "_pid": None, "_fs": None, "path": self.path}

    def get(self) -> AbstractFileSystem:
        """This process's filesystem for the URL."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, self.path = url_to_fs(self.url, **storage_options(self.url, self.storage))
            if split_protocol(self.url)[0] in S3_PROTOCOLS:
                self._fs.retries = (self.storage or StorageSpec()).retries + 1  # type: ignore[attr-defined]
            self._pid = os.getpid()
        return self._fs
