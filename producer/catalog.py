"""The models live workers serve, as a client keeps them between two reads of Redis.

Every client (the synchronous one and the asyncio one) reads ``inferq:models`` (HGETALL),
then in one round trip each model's live set (``ZCOUNT inferq:live:<model> now +inf``) and
the models' routes (``MGET inferq:route:<model> ...``), and decides from this catalog when
to read again, which signature a job is checked against and which version it is pinned
to; only how they call Redis differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from producer import waiting, wire
from producer.submission import ModelInfo, VersionSpec, lookup, pin
from producer.wire.routes import Route, route_key

#: Seconds a catalog read stays fresh: a model whose last worker stopped is refused soon
#: after, not only when the cache misses.
REFRESH_S = 1.0


def parse_models(raw: Mapping[Any, Any]) -> dict[str, ModelInfo]:
    """``HGETALL inferq:models`` (names and JSON signatures, bytes or text) as ModelInfo."""
    out = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        out[name] = ModelInfo(name, json.loads(value))
    return out


def live_count_args(model: str) -> tuple[str, float, str]:
    """The ``ZCOUNT`` arguments that count the workers whose heartbeat still serves
    ``model``."""
    return wire.live_key(model), wire.now(), "+inf"


def routes_args(models: Sequence[str]) -> list[str]:
    """The ``MGET`` keys of the routes of ``models``."""
    return [route_key(m) for m in models]


class ModelCatalog:
    """Signatures every worker ever registered (``known``) and the ones a live worker
    serves now (``live``), with when they were read."""

    def __init__(self, refresh_s: float = REFRESH_S) -> None:
        self.refresh_s = refresh_s
        self.live: dict[str, ModelInfo] = {}
        self.known: dict[str, ModelInfo] = {}
        #: Routes by model; None when they could not be read (no ACL read access).
        self.routes: dict[str, Route] | None = {}
        self.read_at = -1e9

    def update(self, known: dict[str, ModelInfo], live_counts: Sequence[int],
               routes: Sequence[Any] | BaseException = ()) -> dict[str, ModelInfo]:
        """Take a fresh read: ``known`` models and, in its order, each one's live count and
        route document (the MGET reply, or the error reading it raised)."""
        self.known = known
        self.live = {n: i for (n, i), c in zip(known.items(), live_counts, strict=True) if c}
        if isinstance(routes, BaseException):
            self.routes = None
        else:
            self.routes = {n: Route.from_json(doc) for n, doc in zip(known, routes, strict=False)
                           if doc}
        self.read_at = time.monotonic()
        return self.live

    def read(self, known: dict[str, ModelInfo], replies: Sequence[Any]) -> dict[str, ModelInfo]:
        """Take a fresh read from the pipeline that follows ``HGETALL``, run with
        ``raise_on_error=False``: a ZCOUNT per model of ``known``, then the routes' MGET. A
        failed ZCOUNT raises (as the inferq error it stands for); a failed MGET (no read
        access to routes) leaves routes unknown, and submits still go: workers resolve."""
        for reply in replies[:-1]:
            if isinstance(reply, Exception):
                raise (waiting.redis_failure(reply) or reply) from reply
        return self.update(known, replies[:-1], replies[-1] if replies else ())

    def pin(self, model: str, version: VersionSpec, keys: Sequence[str]
            ) -> tuple[list[int | None], str | None]:
        """The version to pin for each job of ``model`` (``keys``: what each job's split is
        hashed on; see :func:`producer.submission.pin`) under the route last read, and the
        route that chose them."""
        if not keys:
            return [], None
        if isinstance(version, int) and not isinstance(version, bool):
            return [version] * len(keys), None
        route = None if self.routes is None else self.routes.get(model, Route())
        info = self.registered(model)
        if version is not None or route is None or not route.split:
            # Only a split gives jobs of one submit different versions.
            one, label = pin(model, route, version, "", info)
            return [one] * len(keys), label
        pinned = [pin(model, route, version, key, info) for key in keys]
        return [v for v, _ in pinned], (pinned[0][1] if pinned else None)

    def needs_read(self, version: VersionSpec) -> bool:
        """Whether pinning ``version`` needs the catalog read again first: it is stale and
        ``version`` is resolved through it (an alias, ``latest``, or none: the split)."""
        return not self.fresh() and (
            version is None or (isinstance(version, str) and not version.isdigit()))

    def fresh(self) -> bool:
        """Whether the last read is recent enough to answer without reading again."""
        return time.monotonic() - self.read_at <= self.refresh_s

    def cached(self, model: str, version: int | None) -> ModelInfo | None:
        """The live signature of ``model`` when the cache can answer alone; None: read the
        catalog again (stale, unknown model or version), then :meth:`lookup`."""
        info = self.live.get(model)
        if not self.fresh() or info is None or (version is not None
                                                and version not in info.versions):
            return None
        return info

    def lookup(self, model: str, version: int | None, *, queue_without_workers: bool
               ) -> ModelInfo | None:
        """The signature a job is checked against, refusing as a submit does
        (ModelNotFound, Unavailable); None when queueing for workers while none ever
        registered the model."""
        return lookup(self.live, self.known, model, version,
                      queue_without_workers=queue_without_workers)

    def registered(self, model: str) -> ModelInfo | None:
        """The signature of a model served now or once: a model queued for while no worker
        is live keeps its registered queue bound and visibility timeout."""
        return self.live.get(model) or self.known.get(model)
