"""RFC 9457 problems with inferq's codes, and the gateway's settings (the security rule)."""

from __future__ import annotations

import pytest

from producer import errors
from producer.wire.connect import is_loopback
from workers.errors import SettingsError
from workers.gateway.problems import STATUS, Problem, failure, from_error
from workers.gateway.settings import GatewaySettings


@pytest.mark.parametrize(("error", "status"), [
    (errors.InvalidInput("bad", job_id="j", model="m"), 400),
    (errors.ModelNotFound("no model"), 404),
    (errors.UnknownJob("nope", job_id="j"), 404),
    (errors.ResourceExhausted("full"), 429),
    (errors.Unavailable("down"), 503),
    (errors.DeadlineExceeded("late", job_id="j"), 504),
    (errors.Poisoned("crashed", job_id="j"), 500),
    (errors.InternalError("model failed", job_id="j"), 500),
    (errors.JobTimeout("waited", ["j"]), 504),
])
def test_each_error_has_its_status_and_code(error: errors.InferqError, status: int) -> None:
    problem = from_error(error)
    assert problem.status == status and problem.code == error.code
    doc = problem.document("/v1/jobs/j")
    assert doc["status"] == status and doc["code"] == error.code and doc["instance"]
    assert doc["type"] == f"urn:inferq:problem:{error.code.lower().replace('_', '-')}"
    assert doc["title"] and doc["detail"]
    if status in (429, 503):
        assert problem.headers["Retry-After"] == "1"


def test_every_wire_code_has_a_status() -> None:
    assert set(errors.CODES) | {"WAIT_TIMEOUT"} <= set(STATUS)


def test_problem_details() -> None:
    unauthenticated = Problem("UNAUTHENTICATED", "send a key")
    assert unauthenticated.status == 401
    assert unauthenticated.headers["WWW-Authenticate"].startswith("Bearer")
    job = from_error(errors.Poisoned("boom", job_id="j1", model="digits")).document()
    assert (job["job_id"], job["model"]) == ("j1", "digits") and "instance" not in job
    assert Problem("RESOURCE_EXHAUSTED", "slow down", headers={"Retry-After": "3"}
                   ).headers["Retry-After"] == "3"
    assert failure(errors.DeadlineExceeded("late")) == {
        "code": "DEADLINE_EXCEEDED", "type": "DeadlineExceeded", "message": "late"}


def test_plain_http_only_on_loopback(tmp_path: object) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("example")
    GatewaySettings(host="127.0.0.2")
    with pytest.raises(SettingsError, match=r"refusing plain HTTP on 0\.0\.0\.0"):
        GatewaySettings(host="0.0.0.0")
    assert GatewaySettings(host="10.0.0.5", allow_insecure_http=True).host == "10.0.0.5"


def test_tls_settings(tmp_path: object) -> None:
    from pathlib import Path

    cert, key = Path(str(tmp_path)) / "c.pem", Path(str(tmp_path)) / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    served = GatewaySettings(host="0.0.0.0", certfile=str(cert), keyfile=str(key), port=8443)
    assert served.url == "https://127.0.0.1:8443"
    with pytest.raises(SettingsError, match="both --certfile and --keyfile"):
        GatewaySettings(certfile=str(cert))
    with pytest.raises(SettingsError, match="no such file"):
        GatewaySettings(certfile=str(cert), keyfile=str(key) + ".missing")


def test_settings_travel_to_worker_processes() -> None:
    settings = GatewaySettings(port=9000, workers=3, rate_limit=7, cors_origins=("https://a",),
                               broker_url="redis://r:1/0", result_url="redis://r:1/0")
    again = GatewaySettings.from_env({"INFERQ_GATEWAY_SETTINGS": settings.to_env()})
    assert again == settings
    for bad in ({"workers": 0}, {"rate_limit": -1}, {"predict_wait_s": 99},
                {"log_format": "xml"}, {"max_body_bytes": 10},
                {"broker_url": "rediss://r:1/0?ssl_cert_reqs=none"}):
        with pytest.raises(SettingsError):
            GatewaySettings(**bad)  # type: ignore[arg-type]
