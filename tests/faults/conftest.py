"""Fault-injection scenarios (reliability.md sections 1, 6, 7): markers, options, fixtures.

Run them with ``pytest tests/faults -m faults -s`` (``-s`` shows the measured figures; a
table of all of them is printed at the end of the run either way).

Fixtures: ``profile_worker`` (workers with the test profile), ``rig`` / ``rig_for`` (a
:class:`~tests.faults.harness.Rig`: workers, ledger and load on one Redis), ``proxied_rig``
(the same behind a :class:`~tests.faults.faultproxy.FaultProxy`),
``redis_factory`` (servers a test kills and restarts), ``supervised`` (a worker under the
launcher's Supervisor), ``figures`` and ``model_repo``. Everything they start is stopped
after the test; a failed test's report ends with the tail of every worker log.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import WorkerProcess
from tests.faults.faultproxy import FaultProxy
from tests.faults.harness import PROFILE, Figures, Rig, Supervised, WorkerFactory
from workers.launch.redisproc import RedisServer

_FIGURES = pytest.StashKey[list[tuple[str, str, str]]]()
#: Log files of the processes a test started, shown when the test fails.
_LOGS = pytest.StashKey[list[Path]]()
_LOG_TAIL_LINES = 60


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="fault tests: stretch the chaos soak to 10 minutes and report "
                          "worker RSS and Redis used_memory growth")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault-injection scenario (real Redis, real "
                                       "workers, processes killed on purpose)")
    config.addinivalue_line("markers", "soak: long-running chaos soak")
    config.stash[_FIGURES] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long", default=False):
        for item in items:
            if item.get_closest_marker("soak"):
                item.add_marker(pytest.mark.timeout(1200))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failed scenario's report ends with the tail of every worker log it made."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for path in item.stash.get(_LOGS, []):
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            report.sections.append((f"log {path.name} (last {_LOG_TAIL_LINES} lines)",
                                    "\n".join(lines[-_LOG_TAIL_LINES:])))
    return report


def _show_log_on_failure(request: pytest.FixtureRequest, path: Path) -> None:
    logs = request.node.stash.setdefault(_LOGS, [])
    if path not in logs:
        logs.append(path)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_FIGURES, [])
    if not rows:
        return
    terminalreporter.section("fault scenarios: measured figures")
    width = max(len(r[0]) for r in rows)
    for test, name, value in rows:
        terminalreporter.write_line(f"{test:<{width}}  {name} = {value}")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Record measured figures: printed now (``-s``) and in the end-of-run table."""
    rows = request.config.stash[_FIGURES]
    test = request.node.name

    def record(**values: object) -> None:
        for name, value in values.items():
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            rows.append((test, name, text))
            print(f"[{test}] {name} = {text}")

    return record


@pytest.fixture
def profile_worker(start_worker: Any, request: pytest.FixtureRequest) -> WorkerFactory:
    """Worker processes with the fault-test profile (VT 10 s, sweep 1 s, batch limit 3 s);
    keyword arguments override it. ``start_worker`` stops every one after the test; the
    report of a failed test ends with each one's log."""

    def make(url: str, **kw: Any) -> WorkerProcess:
        worker: WorkerProcess = start_worker(url, **{**PROFILE, **kw})
        _show_log_on_failure(request, worker.log_path)
        return worker

    return make


@pytest.fixture
def rig_for(profile_worker: WorkerFactory) -> Iterator[Callable[..., Rig]]:
    """``rig_for(url, redis_url=None, socket_timeout=None)``: a :class:`Rig` whose workers
    and producers use ``url`` and whose direct client ``r`` uses ``redis_url`` (default:
    ``url``) with that socket timeout (None: redis-py's default, no timeout). Its loads are
    stopped and clients closed after the test."""
    rigs: list[Rig] = []

    def make(url: str, *, redis_url: str | None = None,
             socket_timeout: float | None = None) -> Rig:
        r = redis.Redis.from_url(redis_url or url, socket_timeout=socket_timeout)
        rigs.append(Rig(url, r, profile_worker))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def rig(fresh_redis: RedisServer, rig_for: Callable[..., Rig]) -> Rig:
    """A :class:`Rig` on this test's own redis-server (``fresh_redis``)."""
    return rig_for(fresh_redis.url)


@pytest.fixture
def proxied_rig(fresh_redis: RedisServer, rig_for: Callable[..., Rig]
                ) -> Iterator[tuple[Rig, FaultProxy]]:
    """A :class:`Rig` whose workers and producers go through a :class:`FaultProxy` in front
    of ``fresh_redis`` (its ``r`` does not), and the proxy.

    The proxy closes before the workers are stopped (as when each test opened its own):
    stopping them first, through a proxy that blackholed their connections, took longer."""
    with FaultProxy(fresh_redis.port) as proxy:
        yield rig_for(proxy.url, redis_url=fresh_redis.url), proxy


@pytest.fixture
def redis_factory() -> Iterator[type[RedisServer]]:
    """RedisServer instances that are always stopped after the test."""
    made: list[RedisServer] = []

    class Tracked(RedisServer):
        def start(self, timeout: float = 10.0) -> RedisServer:
            if self not in made:
                made.append(self)
            return super().start(timeout)

    yield Tracked
    for server in made:
        server.stop()


@pytest.fixture
def supervised(tmp_path: Path, request: pytest.FixtureRequest
               ) -> Iterator[Callable[[str, int], Supervised]]:
    """``supervised(url, max_jobs_per_process)``: a started :class:`Supervised` worker,
    stopped after the test (its log is shown if the test fails)."""
    made: list[Supervised] = []

    def make(url: str, max_jobs_per_process: int) -> Supervised:
        sup = Supervised(url, tmp_path / f"supervised-{len(made)}.log", max_jobs_per_process)
        made.append(sup)
        _show_log_on_failure(request, sup.log_path)
        return sup.start()

    yield make
    for sup in made:
        sup.stop()


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root
