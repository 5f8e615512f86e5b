"""Jobs refused or expired before they can run (reliability.md R18)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from producer import InferenceClient, JobFailed, ResourceExhausted, wire
from tests.faults.harness import (
    DIGITS_QUEUE,
    Figures,
    Rig,
    copy_digits,
    json_doc,
    log_events,
    rows_of,
    wait_for,
    wait_results,
)

pytestmark = pytest.mark.faults


def test_deadline_passes_while_queued(rig: Rig, figures: Figures) -> None:
    """Jobs submitted with ``deadline=0.2`` while no worker runs, the worker started 1 s
    later: each fails DEADLINE_EXCEEDED, and none reaches the model: the worker's ``batch``
    log lines (one per model run, with its row count) count only the control job."""
    url, r = rig.url, rig.r
    # No worker runs yet: the jobs wait for one, as for workers that scale from zero.
    with InferenceClient(url, queue_without_workers=True) as client:
        singles = [client.submit("digits", job, deadline=0.2).id for job in rows_of(range(20))]
        bulk = [h.id for h in client.submit_many("digits", rows_of(range(64)), deadline=0.2)]
    expired = singles + bulk
    submitted = time.monotonic()
    time.sleep(1.0)  # the scenario: the worker starts 1 s later
    worker = rig.worker()
    ready_s = time.monotonic() - submitted
    with InferenceClient(url) as client:
        control = client.submit("digits", rows_of([7])[0])
        assert control.result(timeout=15) is not None
    _, missing = wait_results(r, expired, timeout=15)
    wait_for(lambda: log_events(worker, "batch"), 10, "the control job's batch line")
    docs = {i: json_doc(r.get(wire.result_key(i))) for i in expired}
    codes = {d.get("error", {}).get("code") for d in docs.values()}
    batches = log_events(worker, "batch")
    rows_run = sum(int(b["rows"]) for b in batches)
    failed_lines = [e for e in log_events(worker, "job_failed")
                    if e.get("code") == "DEADLINE_EXCEEDED"]
    figures(expired_jobs=len(expired), codes=sorted(codes), rows_run_by_model=rows_run,
            deadline_failure_lines=len(failed_lines),
            worker_ready_after_submit_s=ready_s)
    assert not missing
    assert codes == {"DEADLINE_EXCEEDED"}
    assert rows_run == 1, batches  # the control job alone reached the model
    assert len(failed_lines) == len(expired)


def test_bounded_queue_refuses_fast_and_loses_nothing(rig: Rig, figures: Figures,
                                                      model_repo: Path) -> None:
    """A copy of digits with ``max_queue = 5``: a worker advertises it and stops (warm);
    5 single jobs are accepted, the 6th is refused with ResourceExhausted in <= 50 ms and
    never enqueued; a new worker then drains the 5."""
    url, r = rig.url, rig.r
    copy_digits(model_repo, max_queue=5)
    first = rig.worker(model_dir=model_repo)
    assert first.stop() == 0
    with InferenceClient(url, queue_without_workers=True) as client:
        # Stopped, its model is no longer advertised, but its signature (and bound) stays.
        assert "digits" not in client.models()
        assert client._known["digits"].max_queue == 5
        accepted = [client.submit("digits", job).id for job in rows_of(range(5))]
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted):
            client.submit("digits", rows_of([5])[0])
        refused_ms = (time.perf_counter() - started) * 1000
        with pytest.raises(ResourceExhausted):
            client.submit_many("digits", rows_of(range(3)))
        queued = r.llen(DIGITS_QUEUE)
        rig.worker(model_dir=model_repo)
        outcomes = client.outcomes(accepted, timeout=30)
    failed = [o for o in outcomes if isinstance(o, JobFailed)]
    figures(accepted=len(accepted), refusal_ms=round(refused_ms, 2), queued_at_refusal=queued,
            lost=len(failed))
    assert refused_ms <= 50
    assert queued == 5
    assert not failed
