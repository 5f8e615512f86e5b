"""Changing a model's route: one atomic step each (the previous route goes to the history),
announced to every worker by pub/sub; ``rollback`` restores the previous route in one step.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Callable, Mapping

import redis

from producer import wire
from producer.errors import InvalidInput, ModelNotFound
from producer.wire.routes import ROUTES_CHANNEL, Route, history_key, route_key

#: Routes kept in a model's history.
HISTORY = 100

# KEYS: route, history. ARGV: expected rev, the new route (JSON), the model, the route
# that stands for "none yet".
_CHANGE = """
local current = redis.call('GET', KEYS[1])
local rev = 0
if current then rev = cjson.decode(current)['rev'] or 0 end
if tonumber(ARGV[1]) ~= rev then return -1 end
-- Before the first route there was none (the latest version): a rollback goes back there.
redis.call('LPUSH', KEYS[2], current or ARGV[4])
redis.call('LTRIM', KEYS[2], 0, HISTORY_LAST)
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', 'ROUTES_CHANNEL', ARGV[3])
return rev + 1
""".replace("HISTORY_LAST", str(HISTORY - 1)).replace("ROUTES_CHANNEL", ROUTES_CHANNEL)

# KEYS: route, history. ARGV: the model, who, when. The previous route comes back with the
# next revision (revisions only grow, so every reader sees the change).
_ROLLBACK = """
local previous = redis.call('LPOP', KEYS[2])
if not previous then return nil end
local current = redis.call('GET', KEYS[1])
local rev = 0
if current then rev = cjson.decode(current)['rev'] or 0 end
local doc = cjson.decode(previous)
doc['rev'] = rev + 1
doc['by'] = ARGV[2]
doc['at'] = tonumber(ARGV[3])
doc['note'] = 'rollback'
local encoded = cjson.encode(doc)
redis.call('SET', KEYS[1], encoded)
redis.call('PUBLISH', 'ROUTES_CHANNEL', ARGV[1])
return encoded
""".replace("ROUTES_CHANNEL", ROUTES_CHANNEL)


#: What the history records for "no route yet": the latest version answers.
_NONE = Route(note="no route: the latest version").to_json()


def who() -> str:
    """``user@host`` of whoever changes a route, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def current(client: redis.Redis, model: str) -> Route:
    raw: bytes | None = client.get(route_key(model))  # type: ignore[assignment]
    return Route.from_json(raw)


def history(client: redis.Redis, model: str, limit: int = 20) -> list[Route]:
    """Earlier routes, newest first."""
    raw: list[bytes] = client.lrange(history_key(model), 0, limit - 1)  # type: ignore[assignment]
    return [Route.from_json(r) for r in raw]


def versions(client: redis.Redis, model: str) -> list[int]:
    """The versions workers registered for ``model``; NOT_FOUND for a model none did."""
    raw = client.hget(wire.MODELS_KEY, model)
    if raw is None:
        raise ModelNotFound(f"model {model!r} is not registered by any worker")
    return sorted(int(v) for v in json.loads(raw).get("versions", []))


def change(client: redis.Redis, model: str, edit: Callable[[Route], Route],
           by: str | None = None) -> Route:
    """Apply ``edit`` to the current route atomically (retrying if someone else changed it
    meanwhile); return the new route."""
    for _ in range(20):
        old = current(client, model)
        new = edit(old)
        new = Route(new.split, new.aliases, old.rev + 1, wire.now(), by or who(), new.note)
        done = client.eval(_CHANGE, 2, route_key(model), history_key(model), old.rev,
                           new.to_json(), model, _NONE)
        if int(done) != -1:
            return new
    raise RuntimeError(f"the route of {model!r} kept changing under us; try again")


def _check(client: redis.Redis, model: str, wanted: Mapping[int, float]) -> None:
    known = versions(client, model)
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise ModelNotFound(f"model {model!r} has no version {missing}; versions: {known}")
    if any(w < 0 for w in wanted.values()) or not any(w > 0 for w in wanted.values()):
        raise InvalidInput("weights must be >= 0 and not all 0")


def set_split(client: redis.Redis, model: str, split: Mapping[int, float],
              by: str | None = None) -> Route:
    """Route jobs that name no version: ``{2: 90, 3: 10}``, or ``{2: 1}`` for one version."""
    _check(client, model, split)
    return change(client, model, lambda r: Route(dict(split), r.aliases), by)


def set_alias(client: redis.Redis, model: str, name: str, version: int | None,
              by: str | None = None) -> Route:
    """Point alias ``name`` at ``version`` (None removes it)."""
    if not name or name.isdigit() or name == "latest":
        raise InvalidInput(f"alias {name!r}: use a name that is not a number or 'latest'")
    if version is not None:
        _check(client, model, {version: 1})

    def edit(route: Route) -> Route:
        aliases = dict(route.aliases)
        if version is None:
            aliases.pop(name, None)
        else:
            aliases[name] = version
        return Route(route.split, aliases)

    return change(client, model, edit, by)


def promote(client: redis.Redis, model: str, version: int, by: str | None = None) -> Route:
    """Send every job that names no version to ``version`` and make it ``stable``."""
    _check(client, model, {version: 1})
    return change(client, model, lambda r: Route({version: 1.0}, {**r.aliases,
                                                                  "stable": version}), by)


def rollback(client: redis.Redis, model: str, by: str | None = None) -> Route | None:
    """Back to the previous route in one step; None when there is no earlier route."""
    raw = client.eval(_ROLLBACK, 2, route_key(model), history_key(model), model, by or who(),
                      wire.now())
    return None if raw is None else Route.from_json(raw)
