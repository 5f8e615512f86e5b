"""Routes: the control state of a model — which version answers a job that names none (one
version, or a weighted split), and aliases (``stable``, ``canary``, any name) for versions.

Kept in Redis as one JSON document per model (``inferq:route:<model>``) with a history list
beside it, changed atomically (:mod:`workers.ops.routes`), read by producers (which resolve
at submit and pin the version in the message) and by workers (which resolve jobs from plain
Celery clients at pick-up). A split is resolved by a hash of the job ID (or of a caller's
``route_key``), so the same job always gets the same version under the same route.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

#: Current route of a model (JSON), and its history (a list, newest first).
ROUTE_KEY_PREFIX = "inferq:route:"
HISTORY_KEY_PREFIX = "inferq:route-history:"
#: Pub/sub channel on which a route change is announced (the message: the model's name).
ROUTES_CHANNEL = "inferq:routes"


def route_key(model: str) -> str:
    return ROUTE_KEY_PREFIX + model


def history_key(model: str) -> str:
    return HISTORY_KEY_PREFIX + model


@dataclass(frozen=True)
class Shadow:
    """Run a ``sample`` (0..1) of the model's jobs through ``version`` too, answering only
    from the version each job was routed to."""

    version: int
    sample: float

    def to_doc(self) -> dict[str, Any]:
        return {"version": self.version, "sample": self.sample}

    @classmethod
    def from_doc(cls, doc: Any) -> Shadow | None:
        # cjson (the rollback script) writes an empty table as a list: read both as none.
        if not isinstance(doc, dict) or "version" not in doc:
            return None
        return cls(int(doc["version"]), float(doc.get("sample", 0.0)))


@dataclass(frozen=True)
class Guard:
    """Roll a split back when one of its non-baseline versions (every version but the one
    with the largest weight), over the last ``window_min`` minutes and once it has
    ``min_jobs`` jobs, fails more than ``error_rate`` of them or answers with a p99 above
    ``p99_ms`` (end to end, enqueued to computed)."""

    error_rate: float | None = None
    p99_ms: float | None = None
    window_min: int = 5
    min_jobs: int = 20

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"window_min": self.window_min, "min_jobs": self.min_jobs}
        if self.error_rate is not None:
            doc["error_rate"] = self.error_rate
        if self.p99_ms is not None:
            doc["p99_ms"] = self.p99_ms
        return doc

    @classmethod
    def from_doc(cls, doc: Any) -> Guard | None:
        if not isinstance(doc, dict) or not ({"error_rate", "p99_ms"} & set(doc)):
            return None
        rate, p99 = doc.get("error_rate"), doc.get("p99_ms")
        return cls(None if rate is None else float(rate), None if p99 is None else float(p99),
                   int(doc.get("window_min", 5)), int(doc.get("min_jobs", 20)))

    def describe(self) -> str:
        parts = ([f"error rate > {self.error_rate:g}"] if self.error_rate is not None else []) + (
            [f"p99 > {self.p99_ms:g} ms"] if self.p99_ms is not None else [])
        return (f"roll back on {' or '.join(parts)} over {self.window_min} min "
                f"(min {self.min_jobs} jobs)")


@dataclass(frozen=True)
class Route:
    """A model's route: ``split`` (version -> weight; empty: the latest version serves),
    ``aliases`` (name -> version), ``rev`` (increases with every change), who and when;
    optionally a ``shadow`` version and a ``guard`` that rolls the split back."""

    split: Mapping[int, float] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)
    rev: int = 0
    at: float = 0.0
    by: str = ""
    note: str = ""
    shadow: Shadow | None = None
    guard: Guard | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "split": {str(v): w for v, w in sorted(self.split.items())},
            "aliases": dict(sorted(self.aliases.items())), "rev": self.rev, "at": self.at,
            "by": self.by, "note": self.note}
        # Only when set: a route without them reads and writes exactly as before.
        if self.shadow is not None:
            doc["shadow"] = self.shadow.to_doc()
        if self.guard is not None:
            doc["guard"] = self.guard.to_doc()
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Route:
        if not raw:
            return cls()
        doc: dict[str, Any] = orjson.loads(raw)
        return cls({int(v): float(w) for v, w in (doc.get("split") or {}).items()},
                   {str(a): int(v) for a, v in (doc.get("aliases") or {}).items()},
                   int(doc.get("rev", 0)), float(doc.get("at", 0.0)), str(doc.get("by", "")),
                   str(doc.get("note", "")), Shadow.from_doc(doc.get("shadow")),
                   Guard.from_doc(doc.get("guard")))

    def baseline(self) -> int | None:
        """The version with the largest weight of the split (None without a split)."""
        if not self.split:
            return None
        return max(sorted(self.split), key=lambda v: self.split[v])

    def describe(self) -> str:
        """``2=90 3=10`` or ``latest``: the default route in one word."""
        if not self.split:
            return "latest"
        total = sum(self.split.values())
        return " ".join(f"{v}={round(100 * w / total, 2):g}" for v, w in sorted(self.split.items()))


def choose(split: Mapping[int, float], key: str) -> int:
    """The version of ``split`` that ``key`` falls on: the same key, the same version."""
    total = sum(w for w in split.values() if w > 0)
    point = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    point_f = point / 2**64 * total
    for version, weight in sorted(split.items()):
        if weight <= 0:
            continue
        if point_f < weight:
            return version
        point_f -= weight
    return max(v for v, w in split.items() if w > 0)


def resolve(route: Route, version: int | str | None, key: str, latest: int
            ) -> tuple[int, str]:
    """The version a job gets, and through which route: a pinned number (``pinned``), an
    alias (``alias:<name>``), or the default route (``split:<rev>`` or ``latest``).

    Raises KeyError for an unknown alias.
    """
    if isinstance(version, int) and not isinstance(version, bool):
        return version, "pinned"
    if isinstance(version, str):
        if version.isdigit():
            return int(version), "pinned"
        if version == "latest":
            return latest, "latest"
        return route.aliases[version], f"alias:{version}"
    if route.split:
        return choose(route.split, key), f"split:{route.rev}"
    return latest, "latest"
