"""Hostile and malformed jobs inside one batch (reliability.md R20-R22, section 3.1)."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer import wire
from tests.faults.harness import (
    DIGITS_QUEUE,
    LABELS,
    Figures,
    Rig,
    X,
    alive,
    in_flight,
    json_doc,
    raw_job,
    result_docs,
    wait_for,
)
from workers.ops import deadletter

pytestmark = pytest.mark.faults

MAX_TENSOR_BYTES = 4096


class _Canary:
    """Unpickling this creates ``path``: proof that something ran pickle.loads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _tensor(arr: np.ndarray[Any, Any]) -> dict[str, Any]:
    return wire.encode_tensor(arr)


def _with_body(message: bytes, content_type: str, body: bytes) -> bytes:
    """The same envelope with another content type and (base64) body."""
    envelope = json.loads(message)
    envelope["content-type"] = content_type
    envelope["content-encoding"] = "binary"
    envelope["body"] = base64.b64encode(body).decode("ascii")
    return json.dumps(envelope).encode()


def test_bad_jobs_in_one_transaction(rig: Rig, figures: Figures, tmp_path: Path) -> None:
    """32 messages pushed in ONE MULTI: 17 bad jobs (one of each kind), a garbage message,
    a bulk message whose 4 entries travel by reference (one of them bad), a job whose
    tensor travels by reference, and 12 good jobs. Each bad job gets its typed error within
    1 s of the push, the garbage lands in the dead-letter list, the good jobs succeed, the
    worker keeps its pid, nothing is unpickled (a live pickle canary stays absent), and
    once the results are deleted Redis holds no blob, entries or unacked keys and its
    ``used_memory`` is back near its baseline."""
    r = rig.r
    worker = rig.worker(INFERQ_NONFINITE="reject", INFERQ_MAX_TENSOR_BYTES=str(MAX_TENSOR_BYTES))
    pid = worker.advertised_pid()
    canary = tmp_path / "pickle-canary"
    yaml_canary = tmp_path / "yaml-canary"
    live = tmp_path / "live-canary"  # the same payload kind, unpickled here on purpose
    pickle.loads(pickle.dumps(_Canary(live))).close()
    assert live.exists(), "the pickle canary payload is not live"

    # Warm up what Redis allocates once (scripts, events), then take the baseline.
    warm = str(uuid.uuid4())
    r.lpush(DIGITS_QUEUE, raw_job(warm, "digits", {"pixels": _tensor(X[:1])}, DIGITS_QUEUE))
    wait_for(lambda: r.exists(wire.result_key(warm)), 10, "the warm-up job")
    r.delete(wire.result_key(warm))
    dlq_before = r.llen(deadletter.DLQ_KEY)
    baseline = int(r.info("memory")["used_memory"])
    keys_before = _key_bytes(r)

    nan = X[:1].copy()
    nan[0, 3] = np.nan
    inf = X[:1].copy()
    inf[0, 5] = np.inf
    good = {"pixels": _tensor(X[:1])}
    pickled = pickle.dumps(_Canary(canary))
    yaml_body = f"!!python/object/apply:os.system ['touch {yaml_canary}']".encode()
    bad: dict[str, tuple[Callable[[str], bytes], str]] = {}

    def job(inputs: dict[str, Any], model: str = "digits", version: int | None = None
            ) -> Callable[[str], bytes]:
        return lambda i: raw_job(i, model, inputs, DIGITS_QUEUE, version)

    bad["wrong dtype"] = (job({"pixels": _tensor(X[:1].astype(np.float64))}), "INVALID_ARGUMENT")
    bad["wrong rank"] = (job({"pixels": _tensor(X[:1].reshape(1, 8, 8))}), "INVALID_ARGUMENT")
    bad["wrong dimension"] = (job({"pixels": _tensor(X[:1, :63])}), "INVALID_ARGUMENT")
    bad["missing input"] = (job({}), "INVALID_ARGUMENT")
    bad["extra input"] = (job({**good, "extra": _tensor(X[:1])}), "INVALID_ARGUMENT")
    bad["empty tensor"] = (job({"pixels": _tensor(np.zeros((0, 64), np.float32))}),
                           "INVALID_ARGUMENT")
    bad["NaN"] = (job({"pixels": _tensor(nan)}), "INVALID_ARGUMENT")
    bad["Inf"] = (job({"pixels": _tensor(inf)}), "INVALID_ARGUMENT")
    bad["unknown model"] = (job(good, model="nope"), "NOT_FOUND")
    bad["unknown version"] = (job(good, version=9), "NOT_FOUND")
    bad["shape/bytes mismatch"] = (
        job({"pixels": {"dtype": "float32", "shape": [1, 64], "data": b"\0" * 100}}),
        "INVALID_ARGUMENT")
    bad["oversized tensor"] = (job({"pixels": _tensor(X[:20])}), "INVALID_ARGUMENT")  # 5120 B
    bad["pickle content type"] = (
        lambda i: _with_body(job(good)(i), "application/x-python-serialize", pickled),
        "INVALID_ARGUMENT")
    bad["yaml content type"] = (
        lambda i: _with_body(job(good)(i), "application/x-yaml", yaml_body), "INVALID_ARGUMENT")
    bad["object dtype"] = (job({"pixels": {"dtype": "object", "shape": [1, 64],
                                           "data": b"\0" * 512}}), "INVALID_ARGUMENT")
    bad["structured dtype V8"] = (job({"pixels": {"dtype": "V8", "shape": [1, 32],
                                                  "data": b"\0" * 256}}), "INVALID_ARGUMENT")
    # msgpack array32 header claiming 2**32 - 1 elements, in 5 bytes.
    bad["msgpack bomb"] = (
        lambda i: _with_body(job(good)(i), "application/x-msgpack", b"\xdd\xff\xff\xff\xff"),
        "INVALID_ARGUMENT")
    ids = {name: str(uuid.uuid4()) for name in bad}

    good_ids = [str(uuid.uuid4()) for _ in range(12)]
    ref_id = str(uuid.uuid4())
    ref_key = wire.blob_key(ref_id, "pixels")
    bulk_ids = [str(uuid.uuid4()) for _ in range(4)]  # the last one is bad
    bulk_id = str(uuid.uuid4())
    entries_key = wire.blob_key(bulk_id, "entries")
    entries = [{"id": i, "inputs": {"pixels": _tensor(X[n:n + 1])}, "version": None}
               for n, i in enumerate(bulk_ids[:3])]
    entries.append({"id": bulk_ids[3],
                    "inputs": {"pixels": _tensor(X[:1].astype(np.int64))}, "version": None})
    garbage = b"\x00\xffthis is not a message\xfe"

    messages = [bad[name][0](ids[name]) for name in bad]
    messages += [raw_job(i, "digits", {"pixels": _tensor(X[n:n + 1])}, DIGITS_QUEUE)
                 for n, i in enumerate(good_ids)]
    messages.append(raw_job(ref_id, "digits", {"pixels": wire.tensor_ref(X[:2], ref_key)},
                            DIGITS_QUEUE))
    messages.append(wire.build_message(
        task=wire.BULK_TASK_NAME, task_id=bulk_id, args=["digits", {"ref": entries_key}],
        kwargs={}, queue=DIGITS_QUEUE, headers={wire.HEADER_JOB_IDS: bulk_ids}))
    messages.append(garbage)
    assert len(messages) == 32

    pipe = r.pipeline(transaction=True)
    pipe.set(ref_key, wire.tensor_bytes(X[:2]))
    pipe.set(entries_key, wire.pack_body(entries, "msgpack"))
    for message in messages:
        pipe.lpush(DIGITS_QUEUE, message)
    pipe.execute()
    pushed = time.monotonic()

    everyone = [*ids.values(), *good_ids, ref_id, *bulk_ids]
    arrived: dict[str, float] = {}
    while len(arrived) < len(everyone) and time.monotonic() - pushed < 10:
        for job_id, doc in result_docs(r, [i for i in everyone if i not in arrived]).items():
            if doc is not None:
                arrived[job_id] = time.monotonic() - pushed
        time.sleep(0.01)
    docs = {i: json_doc(raw) for i, raw in result_docs(r, everyone).items() if raw}
    code = {i: d.get("error", {}).get("code") for i, d in docs.items()}
    wrong_code = {name: code.get(ids[name]) for name, (_, want) in bad.items()
                  if code.get(ids[name]) != want}
    slowest_bad = max((arrived.get(ids[n], 99.0) for n in bad), default=99.0)

    def label(job_id: str) -> int:
        outputs = docs[job_id]["result"]["outputs"]
        return int(wire.decode_tensor(outputs["label"])[0])

    expected = {i: n for n, i in enumerate(good_ids)}
    expected.update({i: n for n, i in enumerate(bulk_ids[:3])})
    good_ok = all(docs.get(i, {}).get("status") == "SUCCESS" and label(i) == int(LABELS[n])
                  for i, n in expected.items())
    ref_ok = docs.get(ref_id, {}).get("status") == "SUCCESS"
    dlq = deadletter.entries(r, 0)[: r.llen(deadletter.DLQ_KEY) - dlq_before]
    garbage_dead = [e for e in dlq if base64.b64decode(e["message_b64"]) == garbage]

    # Clean up what a client reads and an operator clears, then compare memory.
    wait_for(lambda: in_flight(r) == 0, 10, "every message acked")
    r.delete(*[wire.result_key(i) for i in everyone])
    r.ltrim(deadletter.DLQ_KEY, len(dlq), -1)
    leftovers = sorted(k.decode() for pattern in (wire.BLOB_KEY_PREFIX + "*",
                                                  wire.ATTEMPTS_PREFIX + "*")
                       for k in r.scan_iter(pattern))
    after = int(r.info("memory")["used_memory"])
    keys_after = _key_bytes(r)
    figures(bad_jobs=len(bad), wrong_codes=wrong_code, slowest_bad_result_s=slowest_bad,
            good_jobs_ok=good_ok, by_reference_ok=ref_ok, bulk_bad_entry=code.get(bulk_ids[3]),
            dead_lettered=len(garbage_dead), pickle_canary=canary.exists(),
            yaml_canary=yaml_canary.exists(), pid_unchanged=worker.advertised_pid() == pid,
            leftover_keys=leftovers, unacked=in_flight(r),
            used_memory_delta_bytes=after - baseline,
            key_bytes_before=keys_before, key_bytes_after=keys_after)
    assert not wrong_code, wrong_code
    assert slowest_bad <= 1.0
    assert good_ok and ref_ok
    assert code.get(bulk_ids[3]) == "INVALID_ARGUMENT"
    assert len(garbage_dead) == 1 and garbage_dead[0]["kind"] == "message"
    assert not canary.exists() and not yaml_canary.exists()
    assert worker.advertised_pid() == pid == worker.pid
    assert alive(worker)
    assert leftovers == [] and in_flight(r) == 0
    # Every key's MEMORY USAGE is back (the heartbeat's timestamp may change a few bytes);
    # used_memory itself drifts by +-150 KB at rest (client buffers, allocator), so it only
    # gets a coarse bound.
    assert abs(keys_after - keys_before) <= 256, (keys_before, keys_after)
    assert abs(after - baseline) <= 512 * 1024, f"used_memory moved {after - baseline} bytes"


def _key_bytes(client: Any) -> int:
    """What Redis reports every key to use (MEMORY USAGE, summed): the dataset, exactly."""
    return sum(int(client.memory_usage(k) or 0) for k in client.scan_iter(count=1000))


def test_pickle_canary_is_live(tmp_path: Path) -> None:
    """The canary used above really creates its file when unpickled (in another process)."""
    path = tmp_path / "child-canary"
    payload = pickle.dumps(_Canary(path))
    subprocess.run([sys.executable, "-c", "import pickle, sys; "
                    "pickle.loads(sys.stdin.buffer.read()).close()"],
                   input=payload, check=True, timeout=30)
    assert path.exists()
