"""A real S3-compatible server for tests: moto in server mode on a free localhost port, reached over HTTP.

Started as a subprocess this module owns and stopped by its PID. Any access key is accepted by moto; the tests
still send one so that s3fs signs its requests as it would against a real store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.backends.ray_head import free_ports

KEY, SECRET = "test-access-key", "test-secret-key-not-a-real-one"


@dataclass(frozen=True)
class S3Server:
    """Where the server listens."""

    endpoint: str

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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server for the module's tests, stopped by PID at teardown."""
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(endpoint, proc)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
