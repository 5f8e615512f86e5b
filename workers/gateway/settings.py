"""The gateway's settings: one object, built once from options and the environment, and
validated as a whole before anything listens.

The security rule is Flower's (``workers/launch/stack.py``) and stricter: every ``/v1``
call needs an API key, also on loopback; plain HTTP is refused on any address but loopback
unless ``allow_insecure_http`` says a TLS proxy or a private network stands in front.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.wire.connect import broker_url, is_loopback, require_verified_tls, result_url
from workers.errors import SettingsError

#: The environment variable carrying the settings to each uvicorn worker process.
SETTINGS_ENV = "INFERQ_GATEWAY_SETTINGS"


@dataclass(frozen=True)
class GatewaySettings:
    """Everything one gateway process needs."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: uvicorn worker processes.
    workers: int = 1
    certfile: str | None = None
    keyfile: str | None = None
    #: Serve plain HTTP on a non-loopback address (behind a TLS proxy or on a private net).
    allow_insecure_http: bool = False
    broker_url: str = field(default_factory=broker_url)
    result_url: str = field(default_factory=result_url)
    #: Largest request body, in bytes (413 past it).
    max_body_bytes: int = 64 * 1024 * 1024
    #: Requests per second per API key, across every gateway process (0: no limit).
    rate_limit: int = 1000
    #: Seconds an Idempotency-Key, and a job's owner record, are kept.
    idempotency_ttl_s: int = 86_400
    #: Longest ``?wait=`` / ``:predict`` wait, in seconds.
    max_wait_s: float = 60.0
    #: ``:predict``'s wait when the request names none.
    predict_wait_s: float = 30.0
    #: Seconds between two reads of the served models (the OpenAPI document follows them).
    refresh_s: float = 10.0
    #: Origins allowed by CORS; empty: CORS off.
    cors_origins: tuple[str, ...] = ()
    queue_without_workers: bool | None = None
    log_format: str = field(default_factory=lambda: os.environ.get("INFERQ_LOG_FORMAT",
                                                                   "auto"))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def url(self) -> str:
        """Where clients on this host reach the gateway."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def validate(self) -> None:
        """Refuse settings that would serve insecurely or cannot work, saying what to do."""
        if (self.certfile is None) != (self.keyfile is None):
            raise SettingsError("TLS needs both --certfile and --keyfile")
        for path in (self.certfile, self.keyfile):
            if path is not None and not Path(path).is_file():
                raise SettingsError(f"{path}: no such file (--certfile/--keyfile)")
        if not self.tls and not self.allow_insecure_http and not is_loopback(self.host):
            raise SettingsError(
                f"refusing plain HTTP on {self.host}: API keys would cross the network in "
                "clear. Give --certfile and --keyfile, keep --host on 127.0.0.1, or pass "
                "--allow-insecure-http when a TLS proxy or a private network is in front")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be 0-65535, got {self.port}")
        if self.workers < 1:
            raise SettingsError(f"--workers must be at least 1, got {self.workers}")
        if self.max_body_bytes < 1024:
            raise SettingsError("the request size limit must be at least 1024 bytes")
        if self.rate_limit < 0 or self.idempotency_ttl_s < 1:
            raise SettingsError("rate limit must be >= 0 and the idempotency TTL >= 1 s")
        if not 0 < self.predict_wait_s <= self.max_wait_s:
            raise SettingsError("0 < predict wait <= max wait is required")
        if self.log_format not in ("auto", "json", "console"):
            raise SettingsError(f"log format must be auto, json or console, not "
                                f"{self.log_format!r}")
        try:
            require_verified_tls(self.broker_url)
            require_verified_tls(self.result_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def to_env(self) -> str:
        """These settings as JSON, for the worker processes uvicorn spawns."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> GatewaySettings:
        """The settings a parent process put in ``$INFERQ_GATEWAY_SETTINGS``, else the
        defaults (from ``INFERQ_BROKER_URL`` / ``INFERQ_RESULT_URL``)."""
        raw = (os.environ if env is None else env).get(SETTINGS_ENV)
        if not raw:
            return cls()
        doc: dict[str, Any] = json.loads(raw)
        doc["cors_origins"] = tuple(doc.get("cors_origins") or ())
        return cls(**doc)
