"""Hot versions: the model repository watched while serving.

A version added to the repository (``inferq models add``, or an edit by hand) is loaded,
verified and warmed on this module's thread while the model servers keep serving; only once
warm is it given to every instance of its model, to their intake checks, and advertised (so
producers accept jobs pinned to it). A version that fails to load, or would not fit in
memory, is refused with its reason, and the loaded versions keep serving. A version removed
from the repository stops being advertised at once and is unloaded once nothing needs it: no
route names it and no job for it was taken for ``INFERQ_UNLOAD_GRACE_S``. A model new to
the repository gets its servers started.

Workers hear of a change on :data:`~producer.wire.names.MODELS_CHANNEL` (``inferq models
add/remove/reload``) and rescan the repository every ``INFERQ_RESCAN_S`` anyway, so an edit
made by hand is noticed too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import structlog

from producer import wire
from producer.wire.names import MODELS_CHANNEL
from workers.errors import WorkerError
from workers.ops.gcpause import refreeze
from workers.ops.health import Monitor
from workers.ops.metrics import WorkerMetrics
from workers.repository import Manifest, ModelVersion, scan_all
from workers.serving import runtime
from workers.serving.loop import ModelServer
from workers.serving.routing import RouteBook
from workers.settings import Settings

log = structlog.get_logger(__name__)

#: Memory a version takes while it loads, as a multiple of its files' size: the bytes read
#: and verified, the graph ONNX Runtime builds from them, and the initialised weights.
MEMORY_FACTOR = 3.0
_MB = 1024 * 1024
_TICK_S = 0.5

#: Builds and starts the servers of a model new to the repository; returns them.
StartModel = Callable[[Manifest, dict[int, runtime.LoadedModel]], list[ModelServer]]


def signature(manifest: Manifest, versions: list[int], settings: Settings) -> str:
    """The JSON a worker advertises for a model: its signature, the versions it serves, and
    the visibility timeout (producers keep by-reference data alive across a redelivery)."""
    return json.dumps(manifest.signature() | {
        "versions": versions, "visibility_timeout": settings.visibility_timeout_s})


def load_version(manifest: Manifest, version: int, settings: Settings,
                 metrics: WorkerMetrics, threads: int, instances: int) -> runtime.LoadedModel:
    """Verify, load and warm one version (:func:`runtime.load`), then log and count it."""
    started = time.perf_counter()
    model = runtime.load(manifest, version, settings.device, threads)
    seconds = time.perf_counter() - started
    metrics.model_loaded(manifest.name, version, model.provider, seconds)
    log.info("model_loaded", model=manifest.name, version=version, provider=model.provider,
             load_ms=round(seconds * 1000, 1), instances=instances, intra_op_threads=threads)
    return model


# --- will it fit ----------------------------------------------------------------------------


def model_bytes(entry: ModelVersion) -> int:
    """Size of a version's model file and its declared external data files."""
    folder = entry.path.parent
    return entry.path.stat().st_size + sum((folder / name).stat().st_size
                                           for name in entry.external_data)


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the kernel can hand out without swapping (``MemAvailable``); None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_free() -> int | None:
    """Free bytes of the GPU this process runs on (device 0 of ``CUDA_VISIBLE_DEVICES``);
    None when NVML cannot say."""
    from workers.ops.gpu import Nvml

    nvml = Nvml.open(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if nvml is None:
        return None
    try:
        if not nvml.handles:
            return None
        return int(nvml.nvml.nvmlDeviceGetMemoryInfo(nvml.handles[0][1]).free)
    except Exception as exc:  # NVMLError and friends
        log.debug("gpu_memory_unknown", error=str(exc))
        return None
    finally:
        nvml.close()


def memory_refusal(what: str, needed: int, available: int | None, headroom: int,
                   where: str = "memory") -> str | None:
    """Why ``needed`` bytes do not fit in ``available`` less ``headroom``; None if they do
    (or when ``available`` is unknown)."""
    if available is None:
        return None
    room = available - headroom
    if needed <= room:
        return None
    return (f"{what} does not fit in {where}: loading it takes about {needed / _MB:.1f} MB "
            f"({MEMORY_FACTOR:g} x its files), {max(room, 0) / _MB:.1f} MB are free for it "
            f"({available / _MB:.0f} MB available - {headroom / _MB:.0f} MB "
            "INFERQ_MEMORY_HEADROOM_MB); free memory, or serve it from another worker")


def fits(manifest: Manifest, version: int, settings: Settings) -> str | None:
    """Why ``version`` of ``manifest`` would not fit in this process's memory (and, on a GPU
    worker, the GPU's); None if it would."""
    what = f"model {manifest.name} v{version}"
    try:
        needed = int(model_bytes(manifest.versions[version]) * MEMORY_FACTOR)
    except OSError as exc:
        return f"{what}: {exc}"
    headroom = int(settings.memory_headroom_mb * _MB)
    why = memory_refusal(what, needed, mem_available(), headroom)
    if why is None and settings.device == "cuda":
        why = memory_refusal(what, needed, gpu_free(), headroom, "GPU memory")
    return why


def _fingerprint(entry: ModelVersion) -> str:
    """A version's checksum and its file's size and time: a file copied in by hand after its
    manifest entry changes this when the copy completes."""
    try:
        stat = entry.path.stat()
    except OSError:
        return entry.sha256
    return f"{entry.sha256}:{stat.st_size}:{stat.st_mtime_ns}"


# --- what is served -------------------------------------------------------------------------


@dataclass
class Served:
    """One model as this worker serves it: its servers and loaded versions."""

    manifest: Manifest
    servers: list[ModelServer]
    loaded: dict[int, runtime.LoadedModel]
    #: Versions gone from the repository but still loaded, with when they went (epoch s).
    removed: dict[int, float] = field(default_factory=dict)

    @property
    def advertised(self) -> list[int]:
        """The loaded versions still in the repository: the ones producers may pin."""
        return sorted(v for v in self.loaded if v not in self.removed)

    def last_seen(self, version: int) -> float:
        """When any instance last took a job for ``version`` (0: never)."""
        return max((s.intake.seen.get(version, 0.0) for s in self.servers), default=0.0)

    def install(self) -> None:
        """Give every instance the loaded versions, lock-free: each server's ``versions`` and
        its intake's ``checks`` are replaced whole. The servers get the union first and the
        exact set last, so a job the checks let in always finds its version; a job already
        waiting for a version unloaded meanwhile fails alone with NOT_FOUND."""
        loaded = dict(self.loaded)
        advertised = self.advertised
        for server in self.servers:
            server.versions = {**server.versions, **loaded}
        for server in self.servers:
            server.intake.checks = dataclasses.replace(
                server.intake.checks, versions=frozenset(loaded),
                latest=max(advertised) if advertised else None)
        for server in self.servers:
            server.versions = dict(loaded)


class HotVersions:
    """Keeps the served versions in line with the repository; :meth:`run` in a thread."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics, served: dict[str, Served],
                 *, client: redis.Redis, monitor: Monitor, routes: RouteBook,
                 start_model: StartModel, scanned: Mapping[str, Manifest] | None = None
                 ) -> None:
        self.settings, self.metrics = settings, metrics
        self.served = served
        self.client, self.monitor, self.routes = client, monitor, routes
        self.start_model = start_model
        #: (model, version) -> what a refused version was (sha256, file size and time): not
        #: tried again until that changes or someone asks (``inferq models reload``).
        #: file changes or someone asks (``inferq models reload``).
        self.refused: dict[tuple[str, int], str] = {
            (name, v): _fingerprint(entry) for name, m in (scanned or {}).items()
            for v, entry in m.versions.items()
            if name not in served or v not in served[name].loaded}  # refused at start
        self._noted: dict[str, str] = dict(monitor.failed)

    def run(self, stop: threading.Event) -> None:
        """Follow announcements and rescan the repository until ``stop`` is set."""
        pubsub: Any = None
        next_scan = 0.0  # at once: whatever changed since the worker's first scan
        while not stop.is_set():
            message: Any = None
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                    pubsub.subscribe(MODELS_CHANNEL)
                    next_scan = 0.0
                message = pubsub.get_message(timeout=_TICK_S)
            except redis.exceptions.RedisError as exc:
                # Rescans go on without Redis; subscribe again shortly.
                log.debug("models_channel_unavailable", error=str(exc))
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                stop.wait(1.0)
            try:
                if message is not None:
                    data = message["data"]
                    model = data.decode() if isinstance(data, bytes) else str(data)
                    self.sync(model or None, force=True)
                    next_scan = time.monotonic() + self.settings.rescan_s
                elif time.monotonic() >= next_scan:
                    self.sync()
                    next_scan = time.monotonic() + self.settings.rescan_s
                self.unload_idle()
            except Exception:
                # Serving goes on with what is loaded; the next rescan tries again.
                log.exception("hot_versions_failed")
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    # --- loading --------------------------------------------------------------------------

    def sync(self, model: str | None = None, force: bool = False) -> None:
        """Load what the repository added and mark what it removed. ``force`` also retries
        versions refused before (of ``model``, or of every model)."""
        if force:
            self.refused = {k: sha for k, sha in self.refused.items()
                            if model is not None and k[0] != model}
        root = self.settings.model_dir
        try:
            manifests, failed = scan_all(root, self.settings.models)
        except WorkerError as exc:
            self._note("repository", str(exc))  # a repository that went: keep serving
            return
        self._note("repository", None)
        for name in sorted(manifests.keys() | self.served.keys() | failed.keys()):
            if name in manifests:
                self._note(name, None)
                if name in self.served:
                    self._update(self.served[name], manifests[name])
                else:
                    self._add_model(manifests[name])
            elif (root / name / "model.toml").is_file():
                # Being edited, or broken: what is loaded keeps serving.
                self._note(name, failed[name])
            elif name in self.served:
                self._update(self.served[name], None)  # the whole model was removed
        for name, v in list(self.refused):
            if (v not in manifests[name].versions if name in manifests
                    else not (root / name / "model.toml").is_file()):
                self._forget(name, v)  # a refused version that left the repository

    def _update(self, state: Served, manifest: Manifest | None) -> None:
        name = state.manifest.name
        wanted = manifest.versions if manifest is not None else {}
        now = wire.now()
        changed = False
        for v, have in sorted(state.loaded.items()):
            same = v in wanted and wanted[v].sha256 == have.manifest.versions[v].sha256
            if v not in wanted and v not in state.removed:
                state.removed[v] = now
                changed = True
                log.info("model_version_removed", model=name, version=v,
                         unload_grace_s=self.settings.unload_grace_s)
            elif same and v in state.removed:  # put back as it was (another file: loaded below)
                del state.removed[v]
                changed = True
                log.info("model_version_restored", model=name, version=v)
        if changed:
            self._publish(state)  # stop advertising what went, at once
        if manifest is None:
            return
        state.manifest = manifest
        for v in sorted(wanted):
            loaded = state.loaded.get(v)
            if loaded is not None and loaded.manifest.versions[v].sha256 == wanted[v].sha256:
                continue
            model = self._load(manifest, v, len(state.servers), state.advertised)
            if model is not None:
                state.loaded[v] = model
                state.removed.pop(v, None)
                self._publish(state)  # each version as soon as it is warm

    def _add_model(self, manifest: Manifest) -> None:
        instances = manifest.instances or self.settings.instances
        loaded = {}
        for v in sorted(manifest.versions):
            model = self._load(manifest, v, instances, [])
            if model is not None:
                loaded[v] = model
        if not loaded:
            return
        state = Served(manifest, self.start_model(manifest, loaded), loaded)
        self.served[manifest.name] = state
        self.routes.models = sorted(self.served)
        try:
            self.routes.refresh([manifest.name])
        except redis.exceptions.RedisError as exc:
            log.debug("routes_not_refreshed", error=str(exc))  # the heartbeat re-reads them
        log.info("model_started", model=manifest.name, versions=sorted(loaded),
                 instances=len(state.servers))
        self._publish(state)

    def _load(self, manifest: Manifest, version: int, instances: int, serving: list[int]
              ) -> runtime.LoadedModel | None:
        """A version loaded and warm, or None (refused: logged, counted, reported)."""
        name, sha = manifest.name, _fingerprint(manifest.versions[version])
        if self.refused.get((name, version)) == sha:
            return None
        reason = fits(manifest, version, self.settings)
        model = None
        if reason is None:
            try:
                model = load_version(manifest, version, self.settings, self.metrics,
                                     self.settings.session_threads(instances), instances)
            except Exception as exc:  # ManifestError, ONNX Runtime's own, DeviceUnavailable
                reason = str(exc).strip() or type(exc).__name__
        key = f"{name} v{version}"
        if model is None:
            self.refused[(name, version)] = sha
            log.error("model_not_served", model=name, version=version, reason=reason,
                      serving=serving)
            self.metrics.model_ready(name, version, False)
            self.monitor.set_failed(key, reason)
            self._noted[key] = str(reason)
            return None
        self.monitor.set_failed(key, None)
        self._noted.pop(key, None)
        return model

    # --- unloading ------------------------------------------------------------------------

    def unload_idle(self) -> None:
        """Unload removed versions that no route (split, alias, shadow) names and no job came
        for within the grace."""
        now = wire.now()
        unloaded = 0
        for name, state in list(self.served.items()):
            if not state.removed:
                continue
            route = self.routes.get(name)
            named = set()
            if route is not None:  # a split, an alias or the shadow naming a version keeps it
                named = {*route.split, *route.aliases.values(),
                         *((route.shadow.version,) if route.shadow is not None else ())}
            idle = [v for v, since in state.removed.items() if v not in named
                    and now - max(since, state.last_seen(v)) >= self.settings.unload_grace_s]
            for v in idle:
                provider = state.loaded.pop(v).provider
                del state.removed[v]
                self.metrics.model_unloaded(name, v, provider)
                log.info("model_unloaded", model=name, version=v,
                         serving=sorted(state.loaded))
                unloaded += 1
            if idle:
                self._publish(state)
        if unloaded:
            # A version loaded at start was frozen with the startup heap: let its cycles go.
            log.info("gc_refrozen", objects=refreeze())

    # --- telling the others ---------------------------------------------------------------

    def _publish(self, state: Served) -> None:
        state.install()
        advertised = state.advertised
        self.monitor.advertise(state.manifest.name, signature(
            state.manifest, advertised, self.settings) if advertised else None)

    def _forget(self, name: str, version: int) -> None:
        del self.refused[(name, version)]
        self.metrics.model_unloaded(name, version)
        self.monitor.set_failed(f"{name} v{version}", None)
        self._noted.pop(f"{name} v{version}", None)

    def _note(self, key: str, reason: str | None) -> None:
        """Report (once per reason) why ``key`` is not served, or that it is again."""
        if reason is None:
            if self._noted.pop(key, None) is not None:
                self.monitor.set_failed(key, None)
            return
        if self._noted.get(key) != reason:
            self._noted[key] = reason
            log.error("model_not_served", model=key, reason=reason)
            self.monitor.set_failed(key, reason)
