"""API keys: who may call the gateway, for which models and scopes, and who owns a job.

A key is ``iq_`` + 43 random URL-safe characters, shown once when created. Redis keeps only
its SHA-256 (hash ``inferq:gw:keys``: digest → JSON with name, models, scopes, created), so
reading Redis gives no usable key. Every job submitted through the gateway records its key
(``inferq:gw:job:<job id>`` → the key's ID) and is readable only with that key; others get
404, as for an ID that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

#: Hash of SHA-256(key) → key record.
KEYS_KEY = "inferq:gw:keys"
#: Owner of a job submitted through the gateway: ``inferq:gw:job:<job id>`` → key ID.
JOB_OWNER_PREFIX = "inferq:gw:job:"
KEY_PREFIX = "iq_"
#: What a key may do: submit jobs (jobs, jobs:batch, :predict), read jobs and models.
SCOPES = frozenset({"submit", "read"})
#: Where ``revoke`` publishes a revoked key's digest: gateways drop it from their caches.
REVOKED_CHANNEL = "inferq:gw:keys:revoked"
#: Models value meaning every model.
ALL_MODELS = "*"


def digest(key: str) -> str:
    """The SHA-256 (hex) of an API key: what Redis stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def owner_key(job_id: str) -> str:
    return JOB_OWNER_PREFIX + job_id


@dataclass(frozen=True)
class ApiKey:
    """A key's record: its name, the models and scopes it allows."""

    name: str
    #: A short, non-secret ID of the key (a prefix of its digest), recorded as job owner.
    id: str
    models: tuple[str, ...]
    scopes: frozenset[str]
    created: float = 0.0

    def allows_model(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models

    def document(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "models": list(self.models),
                "scopes": sorted(self.scopes), "created": self.created}

    @classmethod
    def from_document(cls, raw: bytes | str) -> ApiKey:
        doc = json.loads(raw)
        return cls(str(doc["name"]), str(doc["id"]), tuple(doc["models"]),
                   frozenset(doc["scopes"]), float(doc.get("created", 0.0)))


def parse_models(models: str) -> tuple[str, ...]:
    """``--models digits,iris`` (or ``*``) as a tuple; refuses an empty list."""
    names = tuple(m.strip() for m in models.split(",") if m.strip())
    if not names:
        raise ValueError("name at least one model (or '*' for all)")
    return names


def parse_scopes(scopes: str) -> frozenset[str]:
    """``--scopes submit,read`` as a set; refuses unknown scopes."""
    names = frozenset(s.strip() for s in scopes.split(",") if s.strip())
    unknown = names - SCOPES
    if unknown or not names:
        raise ValueError(f"scopes must be some of {sorted(SCOPES)}, got {scopes!r}")
    return names


# --- managing keys (the CLI, with a synchronous client) ---------------------------------


def create(r: redis.Redis, name: str, models: Sequence[str], scopes: Iterable[str]
           ) -> tuple[str, ApiKey]:
    """A new key named ``name`` (unique); returns the key itself, which is stored nowhere."""
    if not name or any(c.isspace() for c in name):
        raise ValueError("a key name must be non-empty, without spaces")
    if any(k.name == name for k in list_keys(r)):
        raise ValueError(f"a key named {name!r} exists; revoke it first or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    hashed = digest(key)
    record = ApiKey(name, hashed[:16], tuple(models), frozenset(scopes), time.time())
    r.hset(KEYS_KEY, hashed, json.dumps(record.document()))
    return key, record


def list_keys(r: redis.Redis) -> list[ApiKey]:
    """Every key's record, by name."""
    raw: Mapping[Any, Any] = r.hgetall(KEYS_KEY)
    return sorted((ApiKey.from_document(v) for v in raw.values()), key=lambda k: k.name)


def revoke(r: redis.Redis, name: str) -> bool:
    """Delete the key named ``name`` and tell the gateways (``REVOKED_CHANNEL``); False when
    there is none."""
    raw: Mapping[Any, Any] = r.hgetall(KEYS_KEY)
    for hashed, value in raw.items():
        if ApiKey.from_document(value).name == name:
            r.hdel(KEYS_KEY, hashed)
            r.publish(REVOKED_CHANNEL, hashed)  # gateways that cached it forget it now
            return True
    return False


# --- checking keys (the gateway: limits.admit reads the record) ---------------------------


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX):
        return None
    return token
