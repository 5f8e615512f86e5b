"""Errors of the worker side, under one root: what stops a worker, a launcher or a tool
from doing what it was asked. Each message says what to change.

Errors of a single job are not here: they cross the wire (:mod:`producer.errors`).
"""

from __future__ import annotations

__all__ = [
    "EXIT_NOTHING_TO_SERVE",
    "DeviceUnavailable",
    "FlowerConfigError",
    "LaunchError",
    "ManifestError",
    "RedisRefused",
    "SettingsError",
    "WorkerError",
]


#: Exit status of a worker none of whose models can be served (EX_CONFIG): a supervisor
#: does not restart it, since it would fail the same way until the repository is fixed.
EXIT_NOTHING_TO_SERVE = 78


class WorkerError(Exception):
    """Root of every worker-side error."""


class SettingsError(WorkerError, ValueError):
    """A setting is missing, malformed or contradicts another one."""


class ManifestError(WorkerError, ValueError):
    """A model folder, manifest or ONNX file is malformed or disagrees with the manifest."""


class DeviceUnavailable(WorkerError, RuntimeError):
    """A GPU was asked for but ONNX Runtime cannot use one."""


class LaunchError(WorkerError, RuntimeError):
    """The requested devices or services cannot be started."""


class FlowerConfigError(LaunchError):
    """Flower would be reachable off this host without authentication."""


class RedisRefused(WorkerError, RuntimeError):
    """The Redis server is configured in a way the worker's profile refuses."""
