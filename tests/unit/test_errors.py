"""Typed errors: one class per wire code, read back by type, and the worker-side root.

Fast and Redis-free: documents are built with the writer the workers use
(:func:`producer.wire.failure_document`) and read with the reader producers use.
"""

from __future__ import annotations

import inspect

import orjson
import pytest

from producer import errors as perrors
from producer import wire
from producer.errors import (
    CODES,
    DeadlineExceeded,
    InferqError,
    InternalError,
    InvalidInput,
    JobFailed,
    JobTimeout,
    ModelNotFound,
    Poisoned,
    ResourceExhausted,
    Unavailable,
    error_for_code,
)
from workers import errors as werrors
from workers.errors import SettingsError, WorkerError

#: Each wire code and the class that owns it (the full table, written out on purpose).
BY_CODE: dict[str, type[JobFailed]] = {
    "INVALID_ARGUMENT": InvalidInput,
    "NOT_FOUND": ModelNotFound,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "POISONED": Poisoned,
    "INTERNAL": InternalError,
}


def test_codes_are_exactly_the_job_failed_classes() -> None:
    assert set(CODES) == set(BY_CODE)
    # Every JobFailed subclass the module defines owns one code, and no two share one.
    # UnknownJob is the reader's own (an ID nobody accepted): it never crosses the wire.
    defined = {cls for _, cls in inspect.getmembers(perrors, inspect.isclass)
               if issubclass(cls, JobFailed) and cls not in (JobFailed, perrors.UnknownJob)}
    assert defined == set(BY_CODE.values())
    assert len({cls.code for cls in defined}) == len(defined)


@pytest.mark.parametrize("code", sorted(BY_CODE))
def test_error_for_code_gives_the_class_of_the_code(code: str) -> None:
    error = error_for_code(code, "why", job_id="j-1", model="digits")
    assert type(error) is BY_CODE[code]
    assert isinstance(error, JobFailed) and isinstance(error, InferqError)
    assert error.code == code
    assert (error.job_id, error.model, error.message) == ("j-1", "digits", "why")


def test_error_for_code_without_job_or_model() -> None:
    error = error_for_code("NOT_FOUND", "no such model")
    assert type(error) is ModelNotFound
    assert error.job_id is None and error.model is None
    assert str(error) == "NOT_FOUND: no such model"


def test_an_unknown_code_gives_a_plain_job_failed_keeping_the_code() -> None:
    error = error_for_code("TEAPOT", "short and stout", job_id="j-2", model="digits")
    assert type(error) is JobFailed
    assert error.code == "TEAPOT"
    assert (error.job_id, error.model, error.message) == ("j-2", "digits", "short and stout")
    # The instance's code does not leak into the class or its siblings.
    assert JobFailed.code == "INTERNAL" and InternalError.code == "INTERNAL"


@pytest.mark.parametrize("code", sorted(BY_CODE))
def test_read_result_of_a_failure_document_returns_the_typed_error(code: str) -> None:
    cls = BY_CODE[code]
    doc = wire.failure_document("job-7", cls("it went wrong", job_id="job-7"), "digits")
    error = wire.read_result("job-7", doc)
    assert type(error) is cls
    assert (error.job_id, error.model, error.code) == ("job-7", "digits", code)
    assert error.message == "it went wrong"
    # Raised, it is caught by its own clause and by ``except JobFailed``.
    with pytest.raises(cls) as caught:
        raise error
    assert caught.value is error
    with pytest.raises(JobFailed):
        raise error


def test_read_result_keeps_model_none_when_the_document_has_none() -> None:
    doc = wire.failure_document("job-8", Poisoned("died thrice"))
    assert "model" not in orjson.loads(doc)["error"]
    error = wire.read_result("job-8", doc)
    assert type(error) is Poisoned
    assert error.job_id == "job-8" and error.model is None


def test_read_result_takes_the_job_id_it_is_given() -> None:
    # The reader names the job it asked for, whatever ID the error carried when written.
    doc = wire.failure_document("job-9", DeadlineExceeded("late", job_id="other"), "digits")
    error = wire.read_result("job-9", doc)
    assert type(error) is DeadlineExceeded and error.job_id == "job-9"


def test_read_result_ignores_a_model_that_is_not_text() -> None:
    doc = orjson.loads(wire.failure_document("job-10", InvalidInput("bad"), "digits"))
    doc["error"]["model"] = 42
    error = wire.read_result("job-10", orjson.dumps(doc))
    assert type(error) is InvalidInput and error.model is None


def test_a_plain_celery_failure_reads_as_internal_error() -> None:
    doc = {"status": "FAILURE", "traceback": "Traceback ...", "children": [],
           "date_done": "2000-01-01T00:00:00+00:00", "task_id": "job-11",
           "result": {"exc_type": "ZeroDivisionError", "exc_module": "builtins",
                      "exc_message": ["division by zero"]}}
    error = wire.read_result("job-11", orjson.dumps(doc))
    assert type(error) is InternalError
    assert error.code == "INTERNAL"
    assert error.job_id == "job-11" and error.model is None
    assert "ZeroDivisionError" in error.message and "division by zero" in error.message


def test_a_plain_celery_failure_without_a_result_reads_as_internal_error() -> None:
    error = wire.read_result("job-12", b'{"status": "FAILURE", "result": null}')
    assert type(error) is InternalError and error.job_id == "job-12"


def test_job_timeout_is_not_a_job_failure() -> None:
    timeout = JobTimeout("2 of 2 jobs have no result", ["a", "b"])
    assert isinstance(timeout, InferqError)
    assert not isinstance(timeout, JobFailed)
    assert not issubclass(JobTimeout, DeadlineExceeded)
    assert timeout.code == "WAIT_TIMEOUT"
    assert timeout.code != DeadlineExceeded.code
    assert timeout.code not in CODES
    assert timeout.job_ids == ["a", "b"]
    assert JobTimeout("none pending").job_ids == []


def test_except_job_failed_does_not_catch_a_job_timeout() -> None:
    caught_by = None
    try:
        try:
            raise JobTimeout("1 of 1 jobs have no result", ["j"])
        except JobFailed:
            caught_by = "JobFailed"
        except DeadlineExceeded:  # pragma: no cover - unreachable by design
            caught_by = "DeadlineExceeded"
    except JobTimeout as exc:
        caught_by = "JobTimeout"
        assert exc.job_ids == ["j"]
    assert caught_by == "JobTimeout"


def test_job_timeout_copies_its_ids() -> None:
    ids = ["a"]
    timeout = JobTimeout("waiting", ids)
    ids.append("b")
    assert timeout.job_ids == ["a"]


@pytest.mark.parametrize("code", sorted(BY_CODE))
def test_str_of_a_job_error_names_the_job(code: str) -> None:
    error = error_for_code(code, "the reason", job_id="job-42", model="digits")
    text = str(error)
    assert "job-42" in text and code in text and "the reason" in text
    assert text == f"job job-42 failed: {code}: the reason"


def test_str_of_an_error_without_a_job() -> None:
    assert str(InvalidInput("bad dtype")) == "INVALID_ARGUMENT: bad dtype"
    assert str(JobTimeout("waited 1s", ["x"])) == "WAIT_TIMEOUT: waited 1s"


def test_worker_error_is_the_root_of_every_worker_error() -> None:
    classes = [cls for _, cls in inspect.getmembers(werrors, inspect.isclass)
               if cls.__module__ == werrors.__name__]
    assert {c.__name__ for c in classes} == {n for n in werrors.__all__ if n[0].islower()
                                             or not n.isupper()}
    assert len(classes) >= 7
    for cls in classes:
        assert issubclass(cls, WorkerError), cls
        # Worker errors never cross the wire as job errors.
        assert not issubclass(cls, InferqError), cls


def test_settings_error_is_still_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)
    with pytest.raises(ValueError, match="bad setting"):
        raise SettingsError("bad setting")
    assert issubclass(werrors.FlowerConfigError, werrors.LaunchError)
    assert issubclass(werrors.ManifestError, ValueError)
    assert issubclass(werrors.DeviceUnavailable, RuntimeError)


def test_failure_document_takes_the_model_from_the_error() -> None:
    error = perrors.Poisoned("x", job_id="j", model="digits")
    assert orjson.loads(wire.failure_document("j", error))["error"]["model"] == "digits"


def test_a_malformed_error_object_reads_as_internal() -> None:
    failed = wire.read_result("j", b'{"status": "FAILURE", "error": {}}')
    assert type(failed) is perrors.InternalError and failed.message == ""
