"""The routes of the models a worker serves, as the worker resolves jobs that name no
version (plain Celery clients): kept current by the route pub/sub channel, and re-read on
every heartbeat in case a message was missed."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis
import structlog

from producer.wire.routes import ROUTES_CHANNEL, Route, route_key

log = structlog.get_logger(__name__)


class RouteBook:
    """Current routes by model; ``get`` never touches Redis."""

    def __init__(self, client: redis.Redis, models: Sequence[str]) -> None:
        self.client = client
        self.models = list(models)
        self._routes: dict[str, Route] = {}

    def get(self, model: str) -> Route | None:
        return self._routes.get(model)

    def refresh(self, models: Sequence[str] | None = None) -> None:
        """Re-read the routes of ``models`` (default: all served) in one round trip."""
        names = list(models) if models is not None else self.models
        if not names:
            return
        raw: list[Any] = self.client.mget([route_key(m) for m in names])
        for name, doc in zip(names, raw, strict=True):
            route = Route.from_json(doc)
            old = self._routes.get(name)
            if old is None or old.rev != route.rev:
                self._routes[name] = route
                if old is not None:
                    log.info("route_changed", model=name, rev=route.rev,
                             route=route.describe(), aliases=dict(route.aliases),
                             shadow=None if route.shadow is None else route.shadow.to_doc(),
                             guard=None if route.guard is None else route.guard.describe())

    def listen(self, stop: threading.Event) -> None:
        """Follow route changes until ``stop`` is set (run in a thread of its own)."""
        while not stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(ROUTES_CHANNEL)
                self.refresh()  # whatever changed while not subscribed
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    model = message["data"]
                    model = model.decode() if isinstance(model, bytes) else str(model)
                    if model in self.models:
                        self.refresh([model])
            except redis.exceptions.RedisError:
                # The heartbeat re-reads routes meanwhile; subscribe again shortly.
                stop.wait(1.0)
