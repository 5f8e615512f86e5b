"""Redis connections for every inferq process, and the one TLS policy they share.

Producers, workers, the exporter and the CLI all connect through :func:`connect`, so a
``rediss://`` URL is checked the same way everywhere: certificates are always verified.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.wire.names import DEFAULT_URL

#: The only ``ssl_cert_reqs`` accepted, spelled as redis-py, kombu and Celery all accept it.
CERT_REQUIRED = "required"


def broker_url(env: Mapping[str, str] | None = None) -> str:
    """``$INFERQ_BROKER_URL``, else the default local Redis."""
    env = os.environ if env is None else env
    return env.get("INFERQ_BROKER_URL") or DEFAULT_URL


def result_url(env: Mapping[str, str] | None = None) -> str:
    """``$INFERQ_RESULT_URL``, else the broker URL."""
    env = os.environ if env is None else env
    return env.get("INFERQ_RESULT_URL") or broker_url(env)


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for a message or a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def is_loopback(address: str) -> bool:
    """True for an address only this host can reach: ``localhost``, 127.0.0.0/8, ``::1``.

    Everything else counts as reachable from elsewhere: ``""`` and ``0.0.0.0`` (every
    interface), other IPs, and host names (they may resolve to anything).
    """
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_verified_tls(url: str) -> None:
    """Refuse a Redis URL that turns certificate checking off, half off, or misspells it.

    Raises ValueError naming the setting to fix.
    """
    for key, value in parse_qsl(urlsplit(url).query):
        if key == "ssl_cert_reqs" and value != CERT_REQUIRED:
            raise ValueError(f"{key}={value} is refused: TLS connections must verify "
                             f"certificates (ssl_cert_reqs={CERT_REQUIRED}, the default)")


def tls_options(url: str) -> dict[str, Any] | None:
    """The ssl options kombu (``broker_use_ssl``) and Celery (``redis_backend_use_ssl``)
    take for a ``rediss://`` URL; None for a plain one.

    kombu alone would fall back to ``ssl_cert_reqs=CERT_NONE`` for a ``rediss://`` URL
    without TLS parameters: these options always verify the server.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    require_verified_tls(url)
    query = dict(parse_qsl(parts.query))
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    # Without ssl_ca_certs the system's CA store verifies the server.
    for key in ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"):
        if query.get(key):
            options[key] = query[key]
    if "ssl_check_hostname" in query:
        options["ssl_check_hostname"] = query["ssl_check_hostname"].lower() not in (
            "false", "0", "no", "off")
    return options


def connect(url: str, *, timeout: float = 10.0, connect_timeout: float | None = None,
            retries: int | None = None, health_check_s: int = 0) -> redis.Redis:
    """A Redis client for ``url`` with bounded calls; refuses unverified TLS.

    ``retries`` (quick, without backoff) bounds a call by about ``retries + 1`` times the
    timeout instead of redis-py's default backoff series; None keeps redis-py's default.
    """
    require_verified_tls(url)
    extra: dict[str, Any] = {}
    if retries is not None:
        extra["retry"] = Retry(NoBackoff(), retries)
    if health_check_s:
        extra["health_check_interval"] = health_check_s
    return redis.Redis.from_url(
        url, socket_timeout=timeout,
        socket_connect_timeout=timeout if connect_timeout is None else connect_timeout, **extra)
