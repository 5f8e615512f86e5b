"""Jobs are never decoded with a serializer that can run code.

inferq jobs never pass Celery's consumer: the serving loop reads the model queues itself and
decodes each message with :func:`producer.wire.parse_message`, whose ``_loads_body`` knows
msgpack and JSON and refuses every other content type. That guard is what these tests
exercise, with payloads that would leave a mark if anything decoded them. The same refusal
by a live worker (pickle and YAML messages pushed onto ``inferq.digits``) is asserted in
``tests/faults/test_bad_input.py::test_bad_jobs_in_one_transaction``.

Celery's own ``accept_content`` only governs the control queue; one test keeps it safe.
"""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from kombu.serialization import registry

from producer import wire
from producer.errors import InvalidInput
from workers.app import make_app
from workers.settings import Settings

QUEUE = wire.queue_name("digits")
PICKLE = "application/x-python-serialize"
YAML = "application/x-yaml"


class Canary:
    """Unpickling this creates ``path``: proof that a payload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.write_text, (self.path, "unpickled"))


def _message(content_type: str, body: bytes, *, bulk: bool = False) -> bytes:
    """A message as :func:`producer.wire.build_message` builds it, with another body and
    content type (the way a Celery client with ``task_serializer='pickle'`` would send it)."""
    ids = ["job-1", "job-2", "job-3"] if bulk else ["job-1"]
    message = wire.build_message(
        task=wire.BULK_TASK_NAME if bulk else wire.TASK_NAME, task_id=ids[0],
        args=["digits", {}], kwargs={"version": None}, queue=QUEUE,
        headers={wire.HEADER_JOB_IDS: ids} if bulk else None)
    envelope = json.loads(message)
    envelope["content-type"] = content_type
    envelope["content-encoding"] = "binary"
    envelope["body"] = base64.b64encode(body).decode("ascii")
    return json.dumps(envelope).encode()


def _assert_refused(raw: bytes, content_type: str, ids: list[str]) -> None:
    delivery = wire.parse_message(raw, QUEUE)
    assert delivery.jobs == []
    assert [job_id for job_id, _ in delivery.failed] == ids
    for _, error in delivery.failed:
        assert isinstance(error, InvalidInput)
        assert error.code == "INVALID_ARGUMENT"
        assert f"content type {content_type!r} is refused" in error.message


def test_canary_is_live(tmp_path: Path) -> None:
    """The test of the test: unpickling the canary does create its file."""
    path = tmp_path / "live"
    pickle.loads(pickle.dumps(Canary(path)))
    assert path.read_text() == "unpickled"


@pytest.mark.parametrize("bulk", [False, True], ids=["single", "bulk"])
def test_pickle_message_is_refused_unread(tmp_path: Path, bulk: bool) -> None:
    canary = tmp_path / "canary"
    job = {"pixels": Canary(canary)}
    entries = [{"id": f"job-{n}", "inputs": job, "version": None} for n in (1, 2, 3)]
    body = pickle.dumps([["digits", entries if bulk else job], {}, {}])
    _assert_refused(_message(PICKLE, body, bulk=bulk), PICKLE,
                    ["job-1", "job-2", "job-3"] if bulk else ["job-1"])
    assert not canary.exists(), "a pickle payload was unpickled"


def test_yaml_message_is_refused_unread(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    body = f"!!python/object/apply:pathlib.Path.write_text ['{canary}', 'x']".encode()
    _assert_refused(_message(YAML, body), YAML, ["job-1"])
    assert not canary.exists()


@pytest.mark.parametrize("content_type", [
    "application/x-bson",
    "text/plain",
    "application/data",  # kombu's name for raw bytes
    "",
])
def test_unknown_content_type_is_refused(content_type: str) -> None:
    body = wire.pack_body([["digits", {}], {"version": None}, {}], "msgpack")
    _assert_refused(_message(content_type, body, bulk=True), content_type,
                    ["job-1", "job-2", "job-3"])


def test_control_queue_accepts_no_unsafe_serializer() -> None:
    """Control messages (inspect, Flower) do go through Celery: it decodes msgpack and
    JSON, and replies and results in JSON; never pickle or YAML."""
    url = "redis://127.0.0.1:1/0"  # nothing connects: the app is only configured
    conf = make_app(Settings(broker_url=url, result_url=url)).conf
    assert {registry.name_to_type.get(n, n) for n in conf.accept_content} == {
        "application/x-msgpack", "application/json"}
    assert {registry.name_to_type.get(n, n) for n in conf.result_accept_content} == {
        "application/json"}
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
