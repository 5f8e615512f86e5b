"""TLS to Redis: producer, the worker's own clients and its Celery/kombu side, all verified.

The server listens on a TLS port only (``--port 0``), with a certificate from a CA the test
makes; it also loads the shipped ACL file, as a production Redis would.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from producer import InferenceClient, Unavailable
from producer.wire.connect import connect
from tests.conftest import WorkerProcess, _need_redis
from tests.security.support import Certs, SecureRedis, describe_acl_log, make_certs
from workers.app import make_app
from workers.errors import SettingsError
from workers.settings import Settings

pytestmark = pytest.mark.integration

ROW = np.linspace(0, 16, 64, dtype=np.float32)
VERIFY_FAILED = "certificate verify failed"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_redis(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    _need_redis()
    with SecureRedis(tmp_path_factory.mktemp("tls-redis"), certs=certs) as server:
        yield server


def _app(url: str) -> Celery:
    return make_app(Settings(broker_url=url, result_url=url))


def _kombu_ping(app: Celery) -> Any:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=5)
        return conn.default_channel.client.ping()


def test_server_speaks_tls_only(tls_redis: SecureRedis) -> None:
    plain = redis.Redis.from_url(f"redis://127.0.0.1:{tls_redis.port}/0", socket_timeout=3,
                                 socket_connect_timeout=3)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()


def test_whole_path_over_tls(tls_redis: SecureRedis, tmp_path: Path) -> None:
    """Producer -> queue -> a real worker process (own clients + Celery/kombu) -> results,
    every connection over rediss:// with ssl_cert_reqs=required and the test CA."""
    tls_redis.acl_log_reset()
    worker_url = tls_redis.url_for("worker")
    assert worker_url.startswith("rediss://") and "ssl_cert_reqs=required" in worker_url
    worker = WorkerProcess(tls_redis.url, tmp_path, INFERQ_BROKER_URL=worker_url,
                           INFERQ_RESULT_URL=worker_url)
    worker.start()
    try:
        with InferenceClient(tls_redis.url_for("producer")) as client:
            job = client.submit("digits", {"pixels": ROW})
            assert job.result(timeout=30).worker == worker.hostname
            jobs = client.submit_many("digits", [{"pixels": ROW}] * 20)
            assert len(client.results([j.id for j in jobs], timeout=30)) == 20
        # The worker's Celery consumer (kombu, over TLS) answers remote control.
        admin_app = _app(tls_redis.url)
        replies = admin_app.control.inspect(destination=[worker.hostname], timeout=5).ping()
        assert replies == {worker.hostname: {"ok": "pong"}}
        admin_app.close()
    finally:
        assert worker.stop() == 0, worker.log()
    log = tls_redis.acl_log()
    assert log == [], describe_acl_log(log)
    assert "certificate" not in worker.log().lower(), worker.log()


def test_make_app_gives_kombu_and_the_backend_verifying_tls(
    tls_redis: SecureRedis, certs: Certs
) -> None:
    url = tls_redis.url
    app = _app(url)
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca)}
    assert app.conf.broker_use_ssl == expected
    assert app.conf.redis_backend_use_ssl == expected
    assert _kombu_ping(app)
    assert app.backend.client.ping()
    app.close()


def test_rediss_without_tls_parameters_still_verifies(tls_redis: SecureRedis) -> None:
    """kombu alone would use CERT_NONE for a bare rediss:// URL; make_app never does. The
    system CA store does not know the test CA, so the connection must fail."""
    bare = tls_redis.url.split("?")[0]
    app = _app(bare)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.conf.redis_backend_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with pytest.raises(Exception, match=VERIFY_FAILED):
        _kombu_ping(app)
    with pytest.raises(redis.exceptions.ConnectionError, match=VERIFY_FAILED):
        app.backend.client.ping()
    app.close()


def test_a_wrong_ca_fails_everywhere(tls_redis: SecureRedis, certs: Certs) -> None:
    """Certificate checking is real: a client trusting another CA cannot connect."""
    wrong = tls_redis.url_for("admin", ca=certs.other_ca)
    with pytest.raises(redis.exceptions.ConnectionError, match=VERIFY_FAILED):
        redis.Redis.from_url(wrong, socket_timeout=5).ping()
    app = _app(wrong)
    with pytest.raises(Exception, match=VERIFY_FAILED):
        _kombu_ping(app)
    with pytest.raises(redis.exceptions.ConnectionError, match=VERIFY_FAILED):
        app.backend.client.ping()
    app.close()
    with InferenceClient(tls_redis.url_for("producer", ca=certs.other_ca)) as client, \
            pytest.raises(Unavailable, match=VERIFY_FAILED):
        client.models()


def test_the_right_ca_connects(tls_redis: SecureRedis) -> None:
    started = time.monotonic()
    assert redis.Redis.from_url(tls_redis.url, socket_timeout=5).ping()
    assert time.monotonic() - started < 5


# --- one TLS policy: ssl_cert_reqs=required, spelled exactly so --------------------------------
#
# producer/wire/connect.py holds the policy; the client, Settings, make_app and connect()
# all apply it. Anything but the exact lower-case "required" is refused, upper-case
# included: redis-py itself rejects "REQUIRED" (at connect time), so accepting it in one
# place and not another would let a URL pass one check and fail later.

#: Every refused spelling: off, half off, another case of "required", kombu/Celery's
#: constant names, a percent-encoded "none", and nonsense.
REFUSED = ["none", "optional", "REQUIRED", "Required", "NONE", "Optional", "CERT_NONE",
           "CERT_OPTIONAL", "CERT_REQUIRED", "cert_none", "%6Eone", "bogus", "required+"]
CA = "/nonexistent/ca.pem"  # never read: nothing below connects
PLAIN = "redis://127.0.0.1:1/0"


def _url(reqs: str) -> str:
    return f"rediss://127.0.0.1:1/0?ssl_cert_reqs={reqs}&ssl_ca_certs={CA}"


def _unchecked_settings(url: str) -> Settings:
    """Settings whose URLs skipped Settings' own check, to prove make_app checks too."""
    settings = Settings()
    object.__setattr__(settings, "broker_url", url)
    object.__setattr__(settings, "result_url", url)
    return settings


@pytest.mark.parametrize("reqs", REFUSED)
def test_connect_refuses_every_other_spelling(reqs: str) -> None:
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        connect(_url(reqs))
    # Wherever the parameter sits in the query.
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        connect(f"rediss://127.0.0.1:1/0?ssl_ca_certs={CA}&ssl_cert_reqs={reqs}")


@pytest.mark.parametrize("reqs", REFUSED)
def test_client_refuses_every_other_spelling(reqs: str) -> None:
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        InferenceClient(_url(reqs))
    # The result URL is held to the same policy as the broker URL.
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        InferenceClient(PLAIN, result_url=_url(reqs))


@pytest.mark.parametrize("reqs", REFUSED)
def test_settings_refuse_every_other_spelling(reqs: str) -> None:
    url = _url(reqs)
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        Settings(broker_url=url, result_url=url)
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        Settings(broker_url=PLAIN, result_url=url)
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        Settings.from_env({"INFERQ_BROKER_URL": url})
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        Settings.from_env({"INFERQ_BROKER_URL": PLAIN, "INFERQ_RESULT_URL": url})


@pytest.mark.parametrize("reqs", REFUSED)
def test_make_app_refuses_every_other_spelling(reqs: str) -> None:
    """kombu and Celery also take CERT_NONE, and redis-py rejects upper-case spellings at
    connect time: make_app accepts only 'required', even from settings nobody checked."""
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        make_app(_unchecked_settings(_url(reqs)))
    # Through Settings, as a worker builds it: refused before make_app runs.
    with pytest.raises(SettingsError, match="ssl_cert_reqs"):
        make_app(Settings(broker_url=_url(reqs), result_url=_url(reqs)))


@pytest.mark.parametrize("reqs", ["none", "REQUIRED"])
def test_the_refusal_names_the_setting_and_the_fix(reqs: str) -> None:
    with pytest.raises(ValueError) as caught:
        connect(_url(reqs))
    message = str(caught.value)
    assert f"ssl_cert_reqs={reqs}" in message
    assert "ssl_cert_reqs=required" in message


def test_everyone_accepts_exactly_required() -> None:
    url = _url("required")
    client = connect(url)
    assert client.connection_pool.connection_kwargs["ssl_cert_reqs"] == "required"
    client.close()
    InferenceClient(url).close()
    InferenceClient(PLAIN, result_url=url).close()
    settings = Settings(broker_url=url, result_url=url)
    assert Settings.from_env({"INFERQ_BROKER_URL": url}).result_url == url
    app = make_app(settings)
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": CA}
    assert app.conf.broker_use_ssl == expected
    assert app.conf.redis_backend_use_ssl == expected
    app.close()
    app = make_app(_unchecked_settings(url))
    assert app.conf.broker_use_ssl == expected
    app.close()


def test_required_connects_everywhere_and_upper_case_would_not(tls_redis: SecureRedis) -> None:
    """Against the TLS server: 'required' connects through connect() and the client; the
    upper-case spelling the policy refuses is one redis-py itself cannot use."""
    url = tls_redis.url
    assert "ssl_cert_reqs=required" in url
    client = connect(url, timeout=5)
    assert client.ping()
    client.close()
    with InferenceClient(tls_redis.url_for("producer")) as producer:
        assert isinstance(producer.models(), dict)
    upper = url.replace("ssl_cert_reqs=required", "ssl_cert_reqs=REQUIRED")
    with pytest.raises(redis.exceptions.RedisError, match="REQUIRED"):
        redis.Redis.from_url(upper, socket_timeout=5).ping()


def test_make_app_leaves_plain_redis_alone() -> None:
    app = _app("redis://127.0.0.1:1/0")
    assert not app.conf.broker_use_ssl
    assert not app.conf.redis_backend_use_ssl
