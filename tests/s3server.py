"""An S3 server for the tests: moto's standalone server on 127.0.0.1, or a real MinIO/S3 when
CIRCLES_TEST_S3_ENDPOINT (host:port) and CIRCLES_TEST_S3_ACCESS_KEY / CIRCLES_TEST_S3_SECRET_KEY
are set (CIRCLES_TEST_S3_SECURE=1 for HTTPS, CIRCLES_TEST_S3_REGION if the server needs one).

Each test uses its own bucket (`fresh_bucket()`), so tests never see each other's objects."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import StoreSettings
from appliance.security.secrets import write_secret
from appliance.supervisor import free_port

ENDPOINT_ENV = "CIRCLES_TEST_S3_ENDPOINT"
MOTO_REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str  # host:port
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    secure: bool = False
    region: str | None = None
    real: bool = False  # a real MinIO/S3 rather than moto
    _stop: Any = field(default=None, repr=False)

    def settings(self, state_dir: Path, bucket: str, *, encrypt: bool = False) -> StoreSettings:
        """`[storage]`-style settings for `bucket` on this server, with its two keys stored as
        secrets in `state_dir` under the settings' default secret names. Unencrypted unless
        asked: the encryption wrapper is a separate layer."""
        settings = StoreSettings(backend="s3", endpoint=self.endpoint, bucket=bucket,
                                 secure=self.secure, region=self.region, encrypt=encrypt)
        write_secret(settings.access_key_secret, self.access_key, state_dir)
        write_secret(settings.secret_key_secret, self.secret_key, state_dir)
        return settings

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()


def fresh_bucket(prefix: str = "t") -> str:
    """A bucket name no other test uses."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def start() -> S3Server:
    """The real server the environment names, else moto's ThreadedMotoServer on a free port."""
    if endpoint := os.environ.get(ENDPOINT_ENV):
        return S3Server(endpoint, os.environ["CIRCLES_TEST_S3_ACCESS_KEY"],
                        os.environ["CIRCLES_TEST_S3_SECRET_KEY"],
                        secure=os.environ.get("CIRCLES_TEST_S3_SECURE", "") in ("1", "true", "yes"),
                        region=os.environ.get("CIRCLES_TEST_S3_REGION") or None, real=True)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    port = free_port(39000)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto accepts any key unless told to check them (see `checking_auth`).
    return S3Server(f"127.0.0.1:{port}", "circles-test-access", "circles-test-secret",
                    region=MOTO_REGION, _stop=server.stop)


@contextmanager
def checking_auth(server: S3Server) -> Iterator[S3Server]:
    """A server that checks signatures, with a user allowed everything in S3: the session's
    server itself when it is a real one; else a moto server of its own in a subprocess (moto's
    switch is global to its process, and with it on, moto cannot serve presigned URLs)."""
    if server.real:
        yield server
        return
    port = free_port(39500)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        endpoint = f"127.0.0.1:{port}"
        access, secret = _moto_user(endpoint)
        # From now on moto checks every request's signature against its IAM users.
        urllib.request.urlopen(urllib.request.Request(
            f"http://{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10).close()
        yield S3Server(endpoint, access, secret, region=MOTO_REGION)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _moto_user(endpoint: str) -> tuple[str, str]:
    import boto3  # moto's own dependency

    iam = boto3.client("iam", endpoint_url=f"http://{endpoint}", region_name=MOTO_REGION,
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="circles")
    iam.put_user_policy(UserName="circles", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="circles")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server not listening on {port} after {timeout}s")
