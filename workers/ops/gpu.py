"""GPU gauges through NVML, for the GPUs a worker process may use."""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

log = structlog.get_logger(__name__)


def _visible(index: int, uuid: str, mask: str) -> bool:
    """Whether NVML device ``index`` is in a ``CUDA_VISIBLE_DEVICES`` list (indices or UUIDs)."""
    for token in (t.strip() for t in mask.split(",")):
        if token and (token == str(index) or (not token.isdigit() and uuid.startswith(token))):
            return True
    return False


class Nvml:
    """GPU gauges through NVML, for the GPUs this process may use."""

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls, mask: str | None) -> Nvml | None:
        """None when NVML is missing or fails, or ``mask`` (CUDA_VISIBLE_DEVICES) is empty."""
        if mask is not None and not mask.strip():
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                if mask is None or _visible(index, uuid, mask):
                    handles.append((str(index), handle))
        except Exception as exc:  # ImportError, NVMLError, a driver that is not there
            log.debug("nvml_unavailable", error=str(exc))
            return None
        return cls(pynvml, handles)

    def families(self) -> list[Metric]:
        util = GaugeMetricFamily("inferq_gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy.",
                                 labels=("gpu",))
        used = GaugeMetricFamily("inferq_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=("gpu",))
        total = GaugeMetricFamily("inferq_gpu_memory_total_bytes", "GPU memory.",
                                  labels=("gpu",))
        for label, handle in self.handles:
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                log.debug("nvml_sample_failed", gpu=label, error=str(exc))
                continue
            util.add_metric((label,), rates.gpu / 100.0)
            used.add_metric((label,), memory.used)
            total.add_metric((label,), memory.total)
        return [util, used, total]

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed", error=str(exc))

