"""A real S3-compatible server for tests: moto in server mode on a free localhost port, reached over HTTP.

Started as a subprocess this module owns and stopped by its PID. Any access key is accepted by moto; the tests
still send one so that s3fs signs its requests as it would against a real store. The server's access log (one
line per request) is kept, so tests can count the requests a client made.

`python -m tests.s3server PORT [--host ADDRESS] [--serial] [--ignore-conditions]` serves moto's S3 in two
variants the plain server does not offer: one request at a time (moto checks a precondition and then writes,
which concurrent threads can interleave; S3 itself decides conditional writes atomically), and a store that
ignores `If-Match` / `If-None-Match`, as some S3-compatible stores do.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launch.backends.ray.head import free_ports

KEY, SECRET = "test-access-key", "test-secret-key-not-a-real-one"
REPO = Path(__file__).resolve().parent.parent
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) ')


@dataclass(frozen=True)
class S3Server:
    """Where the server listens, and its access log."""

    endpoint: str
    log: Path | None = None

    def requests(self, method: str, prefix: str) -> list[int]:
        """The status of each logged request of `method` on a path starting with `prefix` (`/bucket/key...`)."""
        assert self.log is not None, "this server keeps no log"
        lines = self.log.read_text(errors="replace").splitlines()
        return [
            int(m[3]) for line in lines if (m := _ACCESS.search(line)) and m[1] == method and m[2].startswith(prefix)
        ]

    def make_bucket(self, name: str) -> None:
        """Create a bucket (a PUT on the bucket's URL, as S3 wants it)."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:  # moto does not check signatures
            assert resp.status == 200


def wait_until_up(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll the server until it answers; fail when its process exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {endpoint} did not answer within {timeout} s")


@contextlib.contextmanager
def running_server(
    log: Path, serial: bool = False, conditions: bool = True, host: str = "127.0.0.1"
) -> Iterator[S3Server]:
    """A moto S3 server on `host` logging to `log`, stopped by PID on exit; `serial` and `conditions` as `serve`
    takes them."""
    port = free_ports(1)[0]
    if serial or not conditions:
        flags = [*(["--serial"] if serial else []), *([] if conditions else ["--ignore-conditions"])]
        cmd = [sys.executable, "-m", "tests.s3server", str(port), "--host", host, *flags]
    else:
        cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    endpoint = f"http://{host}:{port}"
    try:
        wait_until_up(endpoint, proc)
        yield S3Server(endpoint, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server for the module's tests, stopped by PID at teardown."""
    with running_server(tmp_path_factory.mktemp("moto") / "server.log") as server:
        yield server


def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, home: Path, credentials: bool = True) -> None:
    """AWS settings of this test only: no shared config or credentials files, no instance metadata lookups."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if credentials:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)


def serve(host: str, port: int, serial: bool, conditions: bool) -> None:
    """Serve moto's S3 on `host`:`port`: one request at a time when `serial`; dropping the conditional headers of
    every request unless `conditions`."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    moto_app = DomainDispatcherApplication(create_backend_app)

    def unconditional(environ: dict[str, Any], start_response: Any) -> Any:
        for header in ("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH"):
            environ.pop(header, None)
        return moto_app(environ, start_response)

    run_simple(host, port, moto_app if conditions else unconditional, threaded=not serial)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="moto's S3 server, serial or ignoring conditional headers")
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--serial", action="store_true")
    parser.add_argument("--ignore-conditions", action="store_true")
    args = parser.parse_args()
    serve(args.host, args.port, args.serial, not args.ignore_conditions)
