"""Fault-injection scenarios (reliability.md sections 1, 6, 7): markers, options, fixtures.

Run them with ``pytest tests/faults -m faults -s`` (``-s`` shows the measured figures; a
table of all of them is printed at the end of the run either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import WorkerProcess
from tests.faults.harness import PROFILE

_FIGURES = pytest.StashKey[list[tuple[str, str, str]]]()


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


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_FIGURES, [])
    if not rows:
        return
    terminalreporter.section("fault scenarios: measured figures")
    width = max(len(r[0]) for r in rows)
    for test, name, value in rows:
        terminalreporter.write_line(f"{test:<{width}}  {name} = {value}")


class Figures(Protocol):
    def __call__(self, **figures: object) -> None: ...


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


class WorkerFactory(Protocol):
    def __call__(self, url: str, **kw: Any) -> WorkerProcess: ...


@pytest.fixture
def profile_worker(start_worker: Any) -> WorkerFactory:
    """Worker processes with the fault-test profile (VT 10 s, sweep 1 s, batch limit 3 s);
    keyword arguments override it. ``start_worker`` stops every one after the test."""

    def make(url: str, **kw: Any) -> WorkerProcess:
        worker: WorkerProcess = start_worker(url, **{**PROFILE, **kw})
        return worker

    return make


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root
