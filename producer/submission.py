"""Turning a caller's inputs into queue messages, without touching Redis.

Checks inputs against the signature the workers advertise, decides which tensors travel by
reference, and builds single-job and bulk messages with their blobs, and plans the one
transaction that pushes them (:class:`Push`). Every client (the synchronous one, the asyncio
one, and any other front end of the same queue) submits through these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from producer import wire
from producer.errors import InvalidInput, ModelNotFound, ResourceExhausted, Unavailable
from producer.wire import TensorSpec
from producer.wire.routes import Route, choose

#: Jobs per bulk message in submit_many: enough to amortise a message, small enough to batch.
DEFAULT_JOBS_PER_MESSAGE = 32
#: Tensors at least this large travel by reference: raw bytes in their own key, not
#: base64 inside the message (which kombu's transport would then copy into ``unacked``).
DEFAULT_BLOB_THRESHOLD = 16 * 1024

# KEYS[1]: the list to push to (the queue, or its priority list), KEYS[2..]: every list of
# the queue (the bound counts them all). ARGV[1]: most messages allowed to wait (0: no
# bound), ARGV[2]: seconds a job's accepted marker lives at most, ARGV[3]: n job IDs,
# ARGV[4..6]: mark prefix ('' for none), mark value, mark ttl, ARGV[7 .. 6 + n]: the IDs,
# then the messages. Refused as a whole: no marker (nor mark: ``prefix .. id`` set to the
# value, how the gateway records each job's API key) is written for a job that is not queued.
PUSH_SCRIPT = """
local bound = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
if bound > 0 then
  local waiting = 0
  for k = 2, #KEYS do
    waiting = waiting + redis.call('LLEN', KEYS[k])
  end
  if waiting + #ARGV - 6 - n > bound then
    return -1
  end
end
for i = 7, 6 + n do
  redis.call('SET', '""" + wire.ACCEPTED_KEY_PREFIX + """' .. ARGV[i], '1', 'EX', ARGV[2])
end
if ARGV[4] ~= '' then
  for i = 7, 6 + n do
    redis.call('SET', ARGV[4] .. ARGV[i], ARGV[5], 'EX', ARGV[6])
  end
end
return redis.call('LPUSH', KEYS[1], unpack(ARGV, 7 + n))
"""
#: What EVALSHA names the push script by (SHA-1 of its text, as Redis computes it).
PUSH_SCRIPT_SHA = hashlib.sha1(PUSH_SCRIPT.encode()).hexdigest()
#: Messages per push script call (Lua's unpack has a stack limit).
PUSH_CHUNK = 2000

Blobs = dict[str, bytes | memoryview]


class ModelInfo:
    """A served model's signature as its workers advertise it in Redis."""

    def __init__(self, name: str, doc: Mapping[str, Any]) -> None:
        self.name = name
        self.versions: list[int] = sorted(int(v) for v in doc.get("versions", []))
        self.inputs = [TensorSpec.from_json(s) for s in doc.get("inputs", [])]
        self.outputs = [TensorSpec.from_json(s) for s in doc.get("outputs", [])]
        self.max_batch_rows = int(doc.get("max_batch_rows", 0))
        self.max_queue = int(doc.get("max_queue", 0))
        self.description = str(doc.get("description", ""))
        #: The serving workers' visibility timeout: how long a redelivery can take.
        self.visibility_timeout = int(doc.get("visibility_timeout")
                                      or wire.DEFAULT_VISIBILITY_TIMEOUT_S)
        #: Names, dtypes and shapes of inputs already checked against this signature: the
        #: check depends on nothing else, and a producer sends the same few again and again.
        self.checked: set[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]] = set()


def lookup(live: Mapping[str, ModelInfo], known: Mapping[str, ModelInfo], model: str,
           version: int | None, *, queue_without_workers: bool = False) -> ModelInfo | None:
    """The signature to check a job for ``model`` against.

    ``live`` are the models a live worker serves, ``known`` every model a worker ever
    registered. NOT_FOUND for a model no worker knows (or an unknown version); UNAVAILABLE
    for one no live worker serves, unless ``queue_without_workers`` (workers that scale
    from zero): then the registered signature, or None when nothing is registered at all.
    """
    info = live.get(model)
    if info is None:
        info = known.get(model)
        if info is None and known:
            raise ModelNotFound(f"model {model!r} is not served; served: {sorted(live)}"
                                + (f", registered: {sorted(known)}" if known != live else ""))
        if not queue_without_workers:
            raise Unavailable(
                f"no live worker serves model {model!r}: start one (inferq worker, with the "
                "model in its repository), or let jobs wait for workers that scale from "
                "zero (InferenceClient(queue_without_workers=True) or "
                "INFERQ_QUEUE_WITHOUT_WORKERS=1)")
        if info is None:
            return None
    if version is not None and version not in info.versions:
        raise ModelNotFound(f"model {model!r} has no version {version}; versions: "
                            f"{info.versions}")
    return info


#: What a caller may name as a version: a number, ``latest``, an alias, or None (the route).
VersionSpec = int | str | None


def pin(model: str, route: Route | None, version: VersionSpec, key: str,
        info: ModelInfo | None) -> tuple[int | None, str | None]:
    """The version to pin in a job's message, and the route that chose it.

    A number is pinned as it is; ``latest`` is the highest version live workers serve; an
    alias is the version ``route`` gives it; None follows ``route``'s split, by a hash of
    ``key`` (the job ID, or the caller's ``route_key``), exactly as a worker resolves a job
    that names no version. None and no split (or no route read) leaves the job to the
    worker, which gives it the latest version. ``route`` None: the routes could not be
    read, so an alias cannot be resolved (UNAVAILABLE).
    """
    if isinstance(version, bool):
        raise InvalidInput(f"version must be a number, 'latest' or an alias, got {version!r}")
    if isinstance(version, int):
        return version, None
    if isinstance(version, str):
        if version.isdigit():
            return int(version), None
        if version == "latest":
            if info is None or not info.versions:
                return None, None  # no signature: the worker takes its latest
            return max(info.versions), "latest"
        if route is None:
            raise Unavailable(f"cannot read the routes of model {model!r} to resolve alias "
                              f"{version!r} (does this Redis user have read access to "
                              "inferq:route:*?)")
        if version not in route.aliases:
            raise ModelNotFound(
                f"model {model!r} has no alias {version!r} (aliases: "
                f"{', '.join(sorted(route.aliases)) or 'none'}; set one with: inferq alias "
                f"{model} {version} VERSION)")
        return route.aliases[version], f"alias:{version}"
    if version is not None:
        raise InvalidInput(f"version must be a number, 'latest' or an alias, got {version!r}")
    if route is not None and route.split:
        return choose(route.split, key), f"split:{route.rev}"
    return None, None


def _as_array(value: Any, dtype: str | None) -> np.ndarray[Any, Any]:
    # Plain lists carry no dtype: take the model's rather than numpy's float64 default.
    arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype)
    if wire.dtype_name(arr.dtype) is None:
        raise InvalidInput(f"dtype {arr.dtype} is not supported")
    return arr


#: Input kinds (names, dtypes, shapes) a signature remembers as checked: variable-length
#: inputs could otherwise grow the set without bound.
CHECKED_KINDS = 256

#: Tensors of a bulk message below this size travel inside its entries (one raw blob
#: already); larger ones keep a key each, so a message's entries stay a few MB at most.
BULK_INLINE_MAX = 256 * 1024


def bulk_blob_threshold(blob_threshold: int) -> int:
    """The ``blob_threshold`` for the jobs of a bulk message: its entries travel as one
    raw blob already, so tensors below :data:`BULK_INLINE_MAX` stay in them (the worker
    gets them with the entries, not a key each)."""
    return max(blob_threshold, BULK_INLINE_MAX)


def prepare(info: ModelInfo | None, inputs: Mapping[str, Any], job_id: str, blobs: Blobs, *,
            text: bool, blob_threshold: int) -> dict[str, wire.Tensor]:
    """Check one job's inputs against ``info`` (when known) and encode them; tensors of at
    least ``blob_threshold`` bytes go into ``blobs`` and travel by reference."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise InvalidInput("inputs must be a non-empty mapping of input name to array")
    dtypes = {s.name: s.dtype for s in info.inputs} if info is not None else {}
    arrays = {name: _as_array(v, dtypes.get(name)) for name, v in inputs.items()}
    if info is not None:
        for spec in info.inputs:
            arr = arrays.get(spec.name)
            # A single example without the batch axis gets one.
            if arr is not None and spec.shape[:1] == (-1,) and arr.ndim == len(spec.shape) - 1:
                arrays[spec.name] = arr[np.newaxis]
        seen = tuple((name, arr.dtype, arr.shape) for name, arr in arrays.items())
        if seen not in info.checked:
            wire.check_inputs(info.inputs, arrays)
            if len(info.checked) < CHECKED_KINDS:
                info.checked.add(seen)
    tensors = {}
    for name, arr in arrays.items():
        if arr.nbytes >= blob_threshold:
            key = wire.blob_key(job_id, name)
            blobs[key] = wire.tensor_buffer(arr)
            tensors[name] = wire.tensor_ref(arr, key)
        else:
            tensors[name] = wire.encode_tensor(arr, text=text)
    return tensors


def expires(deadline: float | None) -> datetime | None:
    """The ``expires`` stamp of a job with ``deadline`` seconds to live from now."""
    if deadline is None:
        return None
    return datetime.now(timezone.utc) + timedelta(seconds=deadline)


@dataclass
class Envelope:
    """What one job or bulk message carries beyond its inputs."""

    model: str
    client_id: str
    serializer: str = "msgpack"
    version: int | None = None
    deadline: float | None = None
    #: As in Celery on Redis: 0 (the default) is served first, 9 last.
    priority: int = 0
    extra_headers: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        """The list this envelope's messages are pushed to."""
        return wire.priority_queue(wire.queue_name(self.model), self.priority)

    def headers(self, blobs: Sequence[str] = (), inline: int = 0) -> dict[str, Any]:
        """A message's inferq headers; ``blobs``: the keys it reads first; ``inline``: the
        largest result to send in the notification itself."""
        out = {wire.HEADER_ENQUEUED_AT: wire.now(), wire.HEADER_NOTIFY: self.client_id,
               **self.extra_headers}
        if blobs:
            out[wire.HEADER_BLOBS] = list(blobs)
        if inline:
            out[wire.HEADER_NOTIFY_DOCS] = inline
        return out


def single_message(env: Envelope, job_id: str, tensors: dict[str, wire.Tensor]) -> bytes:
    """One job as one Celery task message (what any Celery client could send)."""
    return wire.build_message(
        task=wire.TASK_NAME,
        task_id=job_id,
        args=[env.model, tensors],
        kwargs={"version": env.version},
        queue=wire.queue_name(env.model),
        serializer=env.serializer,
        # A lone job is the one whose result is most often awaited at once: it comes in the
        # notification, not in a read after it.
        headers=env.headers([t["ref"] for t in tensors.values() if "ref" in t],
                            wire.NOTIFY_INLINE_MAX),
        reply_to=env.client_id,
        expires=expires(env.deadline),
        argsrepr=f"({env.model!r}, <{len(tensors)} tensors>)",
        priority=env.priority,
    )


def bulk_messages(env: Envelope, ids: Sequence[str], prepared: Sequence[dict[str, wire.Tensor]],
                  blobs: Blobs, jobs_per_message: int = DEFAULT_JOBS_PER_MESSAGE,
                  versions: Sequence[int | None] | None = None) -> list[bytes]:
    """Jobs ``jobs_per_message`` to a message; each message's entries are stored raw
    (msgpack) in ``blobs`` under a key the message names, so Redis holds tensor bytes
    once and without base64. ``versions``: each job's own pinned version (a split gives
    jobs of one submit different ones), else ``env.version`` for all."""
    stamp = expires(env.deadline)
    messages = []
    for start in range(0, len(prepared), jobs_per_message):
        chunk_ids = list(ids[start : start + jobs_per_message])
        chunk_versions = (versions[start : start + jobs_per_message] if versions is not None
                          else [env.version] * len(chunk_ids))
        chunk = prepared[start : start + jobs_per_message]
        entries: Any = wire.columns_entries(chunk_ids, chunk, chunk_versions)
        if entries is None:  # jobs not alike: one entry each
            entries = [{"id": i, "inputs": t, "version": v}
                       for i, t, v in zip(chunk_ids, chunk, chunk_versions, strict=True)]
        message_id = wire.new_id()
        entries_key = wire.blob_key(message_id, "entries")
        headers = env.headers([entries_key])
        headers[wire.HEADER_JOB_IDS] = chunk_ids
        blobs[entries_key] = wire.pack_body(entries, "msgpack")
        messages.append(wire.build_message(
            task=wire.BULK_TASK_NAME,
            task_id=message_id,
            args=[env.model, {"ref": entries_key}],
            kwargs={},
            queue=wire.queue_name(env.model),
            serializer=env.serializer,
            headers=headers,
            reply_to=env.client_id,
            expires=stamp,
            argsrepr=f"({env.model!r}, <{len(chunk_ids)} jobs>)",
            priority=env.priority,
        ))
    return messages


def envelope(model: str, client_id: str, serializer: str, version: int | None,
             deadline: float | None, priority: int, route: str | None = None) -> Envelope:
    """The envelope of a submit, refusing a priority Celery on Redis does not have;
    ``route`` (how the version was chosen) travels in a header for the result to say."""
    if not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidInput(f"priority must be an integer from 0 (first) to 9 (last), "
                           f"got {priority!r}")
    extra = {wire.HEADER_ROUTE: route} if route else {}
    return Envelope(model, client_id, serializer, version, deadline, priority, extra)


@dataclass(frozen=True)
class Push:
    """One submit as one MULTI/EXEC: its blobs (``SET … EX ttl``), then the push script
    once per :data:`PUSH_CHUNK` messages (EVALSHA :data:`PUSH_SCRIPT_SHA`).

    A refused write (noeviction) aborts the whole transaction, so a caller told "refused"
    never has half its jobs enqueued; a full queue refuses the messages, and the caller
    takes the blobs back (UNLINK) before raising :meth:`full`.
    """

    queue: str
    #: The list pushed to first, then every list of the queue (the bound counts them all).
    lists: list[str]
    #: Messages allowed to wait in the queue (0: no bound).
    bound: int
    #: Seconds blobs and acceptance markers live.
    ttl: int

    @classmethod
    def plan(cls, target: str, model: str, info: ModelInfo | None, blob_ttl: int) -> Push:
        """The push of ``model``'s messages to ``target`` (its queue or a priority list);
        ``info`` the model's registered signature (its queue bound, and the visibility
        timeout by-reference data must outlive: 4 times that, at least ``blob_ttl``)."""
        queue = wire.queue_name(model)
        bound = info.max_queue if info is not None else 0
        ttl = blob_ttl if info is None else max(blob_ttl, 4 * info.visibility_timeout)
        return cls(queue, [target, *wire.priority_queues(queue)], bound, ttl)

    def script_calls(self, messages: Sequence[bytes], jobs: Sequence[Sequence[str]],
                     mark: tuple[str, str, int] | None = None) -> list[list[Any]]:
        """The EVALSHA arguments after the SHA, one list per chunk of messages; ``jobs``
        holds each message's job IDs; ``mark`` ``(prefix, value, ttl_s)``: also set
        ``prefix + job ID`` to ``value`` for each job pushed."""
        prefix, value, ttl = mark or ("", "", 0)
        calls = []
        for start in range(0, len(messages), PUSH_CHUNK):
            chunk = slice(start, start + PUSH_CHUNK)
            ids = [i for message_ids in jobs[chunk] for i in message_ids]
            calls.append([len(self.lists), *self.lists, self.bound, self.ttl, len(ids),
                          prefix, value, ttl, *ids, *messages[chunk]])
        return calls

    @staticmethod
    def refused(replies: Sequence[Any], blobs: int) -> bool:
        """Whether the queue bound refused the push (the script's -1 after the ``blobs``
        SET replies)."""
        return any(r == -1 for r in replies[blobs:])

    def full(self) -> ResourceExhausted:
        """The refusal of a push to a full queue."""
        return ResourceExhausted(f"queue {self.queue!r} is full ({self.bound} messages "
                                 "waiting); retry later or add workers")
