"""Helpers of the security tests: Redis with ACL users and/or TLS, certificates, Flower,
the HTTP gateway.

Every server is a private redis-server on a free port (never 6379), started and stopped by
the test that needs it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, ROOT, python_env
from workers.launch.redisproc import RedisServer, free_port

ACL_TEMPLATE = ROOT / "ops" / "redis" / "users.acl"
ROLES = ("admin", "producer", "worker", "flower", "exporter", "gateway")
_PLACEHOLDER = re.compile(r"\{\{([A-Z]+)_PASSWORD_SHA256\}\}")


def render_acl(passwords: Mapping[str, str]) -> str:
    """``ops/redis/users.acl`` with each ``{{ROLE_PASSWORD_SHA256}}`` replaced by a hash."""
    text = ACL_TEMPLATE.read_text()

    def digest(match: re.Match[str]) -> str:
        return hashlib.sha256(passwords[match.group(1).lower()].encode()).hexdigest()

    rendered = _PLACEHOLDER.sub(digest, text)
    assert "{{" not in rendered, "a placeholder the tests do not know is left in users.acl"
    return rendered


@dataclass(frozen=True)
class Certs:
    """A CA and a server certificate for 127.0.0.1/localhost, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """Generate the CAs and the server certificate with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to generate certificates")
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", f"/CN=inferq test {name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext",
             cwd=directory)
    return Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                 directory / "other-ca.pem")


def tls_query(ca: Path) -> str:
    """The query string that makes a rediss:// URL verify the server against ``ca``."""
    return "?" + urllib.parse.urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)})


class SecureRedis(RedisServer):
    """A private redis-server with the shipped ACL users and/or TLS only (no plain port).

    ``url`` is the admin's URL (what RedisServer's start-up probe and ``client()`` use);
    ``url_for(role)`` is another role's.
    """

    def __init__(self, directory: Path, *, acl: bool = True, certs: Certs | None = None,
                 appendonly: bool = True) -> None:
        self.passwords = {role: secrets.token_urlsafe(18) for role in ROLES}
        self.acl = acl
        self.certs = certs
        directory.mkdir(parents=True, exist_ok=True)
        extra: list[str] = []
        if acl:
            aclfile = directory / "users.acl"
            aclfile.write_text(render_acl(self.passwords))
            aclfile.chmod(0o600)
            extra += ["--aclfile", str(aclfile)]
        super().__init__(directory=directory / "data", appendonly=appendonly,
                         extra_args=extra)
        self._base_args = list(self._args)

    def _spawn(self, timeout: float) -> None:
        args = list(self._base_args)
        if self.certs is not None:
            # After RedisServer's "--port N": the last --port wins, so N becomes the TLS port.
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.certs.server_cert),
                     "--tls-key-file", str(self.certs.server_key),
                     "--tls-ca-cert-file", str(self.certs.ca),
                     "--tls-auth-clients", "no"]
        self._args = args
        super()._spawn(timeout)

    def url_for(self, role: str | None, *, ca: Path | None = None,
                password: str | None = None) -> str:
        """The URL of ``role`` (None: no credentials), over TLS when the server has it."""
        auth = ""
        if role is not None:
            auth = f"{role}:{password or self.passwords[role]}@" if self.acl else ""
        if self.certs is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0" + tls_query(ca or self.certs.ca)

    @property
    def url(self) -> str:
        return self.url_for("admin")

    def acl_log(self) -> list[dict[str, Any]]:
        client = self.client()
        try:
            entries: list[dict[str, Any]] = client.acl_log(count=1000)
            return entries
        finally:
            client.close()

    def acl_log_reset(self) -> None:
        client = self.client()
        try:
            client.acl_log_reset()
        finally:
            client.close()


def describe_acl_log(entries: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{e.get('username')}: {e.get('reason')} {e.get('object')} "
        f"(context {e.get('context')}, count {e.get('count')})" for e in entries
    ) or "(empty)"


# --- Flower --------------------------------------------------------------------------------


def http_get(base: str, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``base + path``: (status, body); HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(base + path)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_http(base: str, alive: Callable[[], bool] = lambda: True,
              timeout: float = 60.0) -> None:
    """Wait until ``base`` answers /healthcheck (Flower's, open without credentials)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            http_get(base, "/healthcheck")
            return
        except OSError:
            pass
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers at {base}")
        time.sleep(0.2)


class _Served:
    """What the Flower and gateway processes share: their log, and a stop that kills what
    does not end within ``stop_timeout`` seconds of SIGTERM."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout = 15.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FlowerProcess(_Served):
    """``celery flower`` on 127.0.0.1 with the given broker URL and extra environment."""

    def __init__(self, broker_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = python_env(**env)
        if "FLOWER_UNAUTHENTICATED_API" not in env:
            environment.pop("FLOWER_UNAUTHENTICATED_API", None)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "celery", f"--broker={broker_url}", "flower",
                 "--address=127.0.0.1", f"--port={self.port}"],
                env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )

    def request(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        return http_get(self.base, path, auth)

    def wait_listening(self, timeout: float = 60.0) -> None:
        try:
            wait_http(self.base, lambda: self.proc.poll() is None, timeout)
        except RuntimeError:
            raise RuntimeError(f"Flower did not start:\n{self.log()}") from None



# --- the HTTP gateway ----------------------------------------------------------------------


class GatewayProcess(_Served):
    """``inferq gateway serve`` on a free loopback port with the given broker URL."""

    stop_timeout = 30.0

    def __init__(self, broker_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = python_env(INFERQ_BROKER_URL=broker_url, INFERQ_RESULT_URL=broker_url,
                                 INFERQ_LOG_FORMAT="json", **env)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "workers.launch.cli", "gateway", "serve", "--port", str(self.port)],
                env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until ``/readyz`` answers 200 (Redis answers and a model is served)."""
        deadline = time.monotonic() + timeout
        status = 0
        while status != 200:
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base, "/readyz")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway is not ready ({status}):\n{self.log()}")
            time.sleep(0.1)

