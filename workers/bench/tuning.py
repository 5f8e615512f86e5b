"""``inferq models add --tune``: measure a graph's rows/s at batch sizes 1, 2, 4 … 1024 and
choose ``max_batch_rows`` (the smallest size past which rows/s grows by less than 10%) and
``max_wait_ms`` (the time one batch of that size takes, at least 1 ms).
"""

from __future__ import annotations

import datetime
import itertools
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from producer.wire import TensorSpec
from workers.errors import ManifestError, WorkerError
from workers.repository.graph import Batching, Graph
from workers.repository.importing import Tuned
from workers.serving import runtime

SIZES = tuple(2**i for i in range(11))  # 1 … 1024
#: A larger batch must add at least this much throughput to be worth its latency.
MIN_GAIN = 0.10
#: A batch slower than this ends the sweep: no worker should wait on a larger one.
SLOWEST_RUN_S = 1.0
#: Inputs larger than this end the sweep (memory, and no queue carries such batches).
LARGEST_BATCH_BYTES = 256 << 20
MIN_WAIT_MS = 1.0


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``NAME=VALUE`` pairs (``--dim seq=128``) as a mapping; raises :class:`ManifestError`."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name or not raw.isdigit() or int(raw) < 1:
            raise ManifestError(f"--dim {item!r}: expected NAME=VALUE with VALUE >= 1")
        dims[name] = int(raw)
    return dims


def choose(rows_per_s: Mapping[int, float], min_gain: float = MIN_GAIN) -> int:
    """The smallest measured size whose next size adds less than ``min_gain`` rows/s."""
    sizes = sorted(rows_per_s)
    for size, bigger in itertools.pairwise(sizes):
        if rows_per_s[bigger] < rows_per_s[size] * (1 + min_gain):
            return size
    return sizes[-1]


def _shape(spec: TensorSpec, symbols: Sequence[str | None], rows: int,
           dims: Mapping[str, int]) -> list[int]:
    shape = [rows]
    for axis, size in enumerate(spec.shape[1:], start=1):
        symbol = symbols[axis] if axis < len(symbols) else None
        shape.append(size if size != -1 else dims.get(symbol or "", 1))
    return shape


def _feeds(batching: Batching, graph: Graph, rows: int, dims: Mapping[str, int],
           rng: np.random.Generator) -> dict[str, np.ndarray[Any, Any]]:
    symbols = {t.spec.name: t.symbols for t in graph.inputs}
    feeds = {}
    for spec in batching.inputs:
        shape = _shape(spec, symbols[spec.name], rows, dims)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:  # zeros are valid indices and flags for any embedding or mask input
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def _seconds_per_run(session: Any, feeds: Mapping[str, Any], budget_s: float) -> float:
    session.run(None, feeds)  # allocations for this size happen here, not in the timing
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < 200):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
        spent += times[-1]
        if times[-1] > SLOWEST_RUN_S:
            break
    return statistics.median(times)


def measure(path: Path, graph: Graph, batching: Batching, *, dims: Mapping[str, int],
            device: str = "cpu", threads: int = 0, budget_s: float = 0.25
            ) -> tuple[dict[int, float], dict[int, float], str]:
    """Rows/s and seconds per run by batch size, and why the sweep stopped ("" if it did not)."""
    known = {s for t in graph.inputs for s in t.symbols[1:] if s}
    unknown = sorted(set(dims) - known)
    if unknown:
        raise ManifestError(f"--dim {', '.join(unknown)}: not a dimension of the graph's "
                            f"inputs (its named dimensions: {sorted(known) or 'none'})")
    session = runtime.create_session(path, device, threads)
    rng = np.random.default_rng(0)
    rows_per_s: dict[int, float] = {}
    seconds: dict[int, float] = {}
    for size in SIZES:
        feeds = _feeds(batching, graph, size, dims, rng)
        if sum(a.nbytes for a in feeds.values()) > LARGEST_BATCH_BYTES:
            return rows_per_s, seconds, f"batch {size} needs over 256 MB of inputs"
        try:
            seconds[size] = _seconds_per_run(session, feeds, budget_s)
        except Exception as exc:  # ONNX Runtime's errors: out of memory, a bad shape …
            if not rows_per_s:
                raise ManifestError(f"--tune: the graph fails on a batch of {size}: "
                                    f"{str(exc).strip().splitlines()[0]}") from None
            return rows_per_s, seconds, f"batch {size} failed"
        rows_per_s[size] = size / max(seconds[size], 1e-9)
        if seconds[size] > SLOWEST_RUN_S:
            return rows_per_s, seconds, f"batch {size} took over {SLOWEST_RUN_S:g} s"
    return rows_per_s, seconds, ""


def tune(path: Path, graph: Graph, batching: Batching, *, dims: Mapping[str, int] | None = None,
         device: str = "cpu", threads: int = 0, budget_s: float = 0.25) -> Tuned:
    """Measure ``path`` and return the batching values to write, with the measurement as a
    TOML comment. Raises :class:`ManifestError` (or :class:`DeviceUnavailable`)."""
    dims = dict(dims or {})
    try:
        rows_per_s, seconds, stopped = measure(path, graph, batching, dims=dims, device=device,
                                               threads=threads, budget_s=budget_s)
    except WorkerError:
        raise
    except Exception as exc:
        raise ManifestError(f"--tune: {exc}") from None
    best = choose(rows_per_s)
    wait = math.ceil(max(MIN_WAIT_MS, seconds[best] * 1000) * 10) / 10
    table = ", ".join(f"{size}: {rate:,.0f}" for size, rate in rows_per_s.items())
    bigger = [s for s in rows_per_s if s > best]
    why = (f"{bigger[0]} adds < {MIN_GAIN:.0%}" if bigger
           else stopped or f"the largest size, {max(SIZES)}")
    free = sorted({s for t in graph.inputs for s in t.symbols[1:] if s})
    used = ", ".join(f"{s}={dims.get(s, 1)}" for s in free)
    comment = [
        f"# inferq models add --tune ({device}, {threads or 'default'} threads, "
        f"{datetime.date.today().isoformat()}): rows/s by batch size {table}",
        f"# max_batch_rows = {best} ({why}); max_wait_ms = one batch of {best} "
        f"({seconds[best] * 1000:.2f} ms, at least {MIN_WAIT_MS:g} ms)"
        + (f"; inputs with {used}" if used else ""),
    ]
    return Tuned(best, wait, tuple(comment))
