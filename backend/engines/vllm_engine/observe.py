"""What the vLLM engine shows in `/health` and `/metrics`: its scheduler's latest figures (KV-cache use,
running and waiting requests, prefix-cache hits), the KV-cache capacity, and GPU memory.

vLLM hands every step's `SchedulerStats` to the stat loggers it was given; `StepStatsLogger` keeps the latest
ones in a `StepStats` the engine reads. GPU memory is read through NVML: the model lives in vLLM's engine
core, another process, so this process's torch allocator has nothing to say about it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from backend.process_memory import process_rss_bytes

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """The scheduler's figures as of its latest step, and the KV cache's size once known."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # share of the KV-cache blocks in use
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0
    preemptions: int = 0
    steps: int = 0
    kv_cache_blocks: int | None = None
    block_size: int | None = None

    @property
    def kv_cache_tokens(self) -> int | None:
        """Tokens the KV cache holds at most (all sequences together)."""
        if self.kv_cache_blocks is None or self.block_size is None:
            return None
        return self.kv_cache_blocks * self.block_size

    def as_dict(self) -> dict[str, Any]:
        """The KV-cache part of `/health`."""
        return {
            "blocks": self.kv_cache_blocks,
            "block_size": self.block_size,
            "capacity_tokens": self.kv_cache_tokens,
            "usage": round(self.kv_cache_usage, 4),
            "prefix_cache_hit_rate": round(self.prefix_cache_hits / self.prefix_cache_queries, 4)
            if self.prefix_cache_queries
            else None,
            "preemptions": self.preemptions,
        }


def stat_logger_factory(stats: StepStats):
    """A vLLM `StatLoggerFactory` whose loggers write into `stats` (vLLM is imported by the caller)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepStatsLogger(StatLoggerBase):
        """Keeps the latest scheduler figures; logs nothing itself (our access log and /metrics do)."""

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self._cache_config = vllm_config.cache_config

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                stats.steps += 1
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = scheduler_stats.num_waiting_reqs
                stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                stats.prefix_cache_queries += getattr(prefix, "queries", 0)
                stats.prefix_cache_hits += getattr(prefix, "hits", 0)
            if iteration_stats is not None:
                stats.preemptions += iteration_stats.num_preempted_reqs

        def log_engine_initialized(self) -> None:
            stats.kv_cache_blocks = self._cache_config.num_gpu_blocks
            stats.block_size = self._cache_config.block_size

    return StepStatsLogger


_nvml: Any = None  # pynvml once initialised; False where there is no NVIDIA driver


def _nvml_module() -> Any:
    """pynvml, initialised once per process (initialising on every /health or scrape costs milliseconds)."""
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # no driver, no library: a CPU machine
            _nvml = False
    return _nvml


def gpu_memory() -> list[dict[str, Any]]:
    """Used and total bytes of each visible GPU, from NVML (empty without an NVIDIA driver)."""
    nvml = _nvml_module()
    if not nvml:
        return []
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        gpus.append(
            {
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "used_bytes": int(info.used),
                "free_bytes": int(info.free),
                "total_bytes": int(info.total),
            }
        )
    return gpus


def memory_report(engine_core_pids: list[int]) -> dict[str, Any]:
    """This process's RSS, the engine core processes' RSS, and each GPU's memory."""
    return {
        "process_rss_bytes": process_rss_bytes(),
        "engine_core_rss_bytes": sum(process_rss_bytes(pid) for pid in engine_core_pids),
        "gpus": gpu_memory(),
    }


def child_pids() -> list[int]:
    """This process's children (vLLM's engine core and its workers), from /proc; empty where it is absent."""
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as children:
                pids += [int(pid) for pid in children.read().split()]
    except OSError:
        return []
    return pids
