"""Changing a model's route: one atomic step each (the previous route goes to the history),
announced to every worker by pub/sub; ``rollback`` restores the previous route in one step
(its split, aliases, shadow and guard together). ``promote`` checks the candidate's recent
error rate and p99 against the current version's first (:mod:`workers.ops.versionstats`).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import redis

from producer import wire
from producer.errors import InvalidInput, ModelNotFound
from producer.wire.routes import ROUTES_CHANNEL, Guard, Route, Shadow, history_key, route_key

if TYPE_CHECKING:
    from workers.ops.versionstats import Review

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

# KEYS: route, history. ARGV: the model, who, when, the note, the expected rev ('' for any).
# The previous route comes back with the next revision (revisions only grow, so every reader
# sees the change). With an expected rev, a route changed meanwhile is left alone (-1): of
# several workers rolling back the same route, one wins.
_ROLLBACK = """
local current = redis.call('GET', KEYS[1])
local rev = 0
if current then rev = cjson.decode(current)['rev'] or 0 end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= rev then return -1 end
local previous = redis.call('LPOP', KEYS[2])
if not previous then return nil end
local doc = cjson.decode(previous)
doc['rev'] = rev + 1
doc['by'] = ARGV[2]
doc['at'] = tonumber(ARGV[3])
doc['note'] = ARGV[4]
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
        new = dataclasses.replace(new, rev=old.rev + 1, at=wire.now(), by=by or who())
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
              by: str | None = None, guard: Guard | None = None) -> Route:
    """Route jobs that name no version: ``{2: 90, 3: 10}``, or ``{2: 1}`` for one version.

    ``guard`` rolls this split back automatically when a non-baseline version breaches it;
    a new split without one is unguarded. The shadow setting stays as it is.
    """
    _check(client, model, split)
    if guard is not None and (guard.error_rate is None and guard.p99_ms is None):
        raise InvalidInput("a guard needs an error rate or a p99 to roll back on")
    return change(client, model, lambda r: dataclasses.replace(
        r, split=dict(split), guard=guard, note=""), by)


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
        return dataclasses.replace(route, aliases=aliases, note="")

    return change(client, model, edit, by)


def set_shadow(client: redis.Redis, model: str, version: int | None, sample: float = 0.1,
               by: str | None = None) -> Route:
    """Run ``sample`` (0..1] of the model's jobs through ``version`` as well, off the results
    path; ``version=None`` turns the shadow off."""
    if version is not None:
        _check(client, model, {version: 1})
        if not 0 < sample <= 1:
            raise InvalidInput(f"--sample must be in (0, 1], got {sample}")
    shadow = None if version is None else Shadow(version, float(sample))
    return change(client, model, lambda r: dataclasses.replace(r, shadow=shadow, note=""), by)


class PromotionRefused(Exception):
    """The candidate did worse than the current version over their recent jobs."""

    def __init__(self, message: str, review: Review) -> None:
        super().__init__(message)
        self.review = review


def current_version(client: redis.Redis, model: str, route: Route | None = None) -> int:
    """The version most unpinned traffic goes to now: the split's largest weight, else the
    ``stable`` alias, else the latest version."""
    route = current(client, model) if route is None else route
    baseline = route.baseline()
    if baseline is not None:
        return baseline
    if "stable" in route.aliases:
        return route.aliases["stable"]
    return max(versions(client, model))


def review_promotion(client: redis.Redis, model: str, version: int, window_min: int = 5,
                     max_error_increase: float = 0.01, max_p99_increase: float = 0.2) -> Review:
    """The :class:`~workers.ops.versionstats.Review` of promoting ``version``: its last
    ``window_min`` minutes against the current version's. It refuses when the candidate's
    error rate exceeds the current one's by more than ``max_error_increase`` (0.01: one
    point) or its p99 by more than ``max_p99_increase`` (0.2: 20%); a candidate with no
    recent jobs is not judged."""
    from workers.ops import versionstats

    _check(client, model, {version: 1})
    return versionstats.review(client, model, version, current_version(client, model),
                               window_min, max_error_increase, max_p99_increase)


def promote(client: redis.Redis, model: str, version: int, by: str | None = None, *,
            review: Review | None = None, force: bool = False) -> Route:
    """Send every job that names no version to ``version`` and make it ``stable`` (a guard
    on the old split goes with it).

    With a ``review`` (:func:`review_promotion`) that refuses, raises
    :class:`PromotionRefused` unless ``force``.
    """
    _check(client, model, {version: 1})
    refused = review is not None and bool(review.refusals)
    if review is not None and refused and not force:
        raise PromotionRefused(f"not promoting {model} v{version}: " + "; ".join(
            review.refusals) + " (--force promotes anyway)", review)
    return change(client, model, lambda r: dataclasses.replace(
        r, split={version: 1.0}, aliases={**r.aliases, "stable": version}, guard=None,
        note="promote, forced" if refused else ""), by)


def rollback(client: redis.Redis, model: str, by: str | None = None, *,
             expected_rev: int | None = None, note: str = "rollback") -> Route | None:
    """Back to the previous route in one step; None when there is no earlier route, or when
    ``expected_rev`` is given and the route is no longer at that revision."""
    script = client.register_script(_ROLLBACK)  # EVALSHA: what the worker's ACL allows
    raw = script(keys=[route_key(model), history_key(model)],
                 args=[model, by or who(), wire.now(), note,
                       "" if expected_rev is None else expected_rev])
    if raw is None or raw == -1:
        return None
    return Route.from_json(raw)
