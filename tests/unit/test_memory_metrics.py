"""GPU memory in /metrics from either engine's report: every engine's used and total bytes, the allocator's
figures where the model lives in the server's process, and the engine processes' memory in the RSS."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from backend.metrics import Metrics

GIB = 2**30


class ReportingEngine:
    """Just what `Metrics` reads from an engine."""

    def __init__(self, report: dict) -> None:
        self._report = report

    def memory(self) -> dict:
        return self._report

    def queue_sizes(self) -> tuple[int, int]:
        return (0, 0)


def samples(report: dict) -> dict[tuple[str, str], float]:
    text = Metrics("tiny", ReportingEngine(report)).render().decode()
    return {
        (sample.name, sample.labels.get("gpu", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("shizhen:")
    }


def test_an_engine_in_another_process_reports_used_bytes_and_its_processes_memory():
    vllm_like = {
        "process_rss_bytes": 1 * GIB,
        "engine_core_rss_bytes": 3 * GIB,
        "gpus": [{"index": 0, "used_bytes": 70 * GIB, "free_bytes": 10 * GIB, "total_bytes": 80 * GIB}],
    }
    values = samples(vllm_like)
    assert values[("shizhen:gpu_memory_used_bytes", "0")] == 70 * GIB
    assert values[("shizhen:gpu_memory_total_bytes", "0")] == 80 * GIB
    assert ("shizhen:gpu_memory_allocated_bytes", "0") not in values
    assert values[("shizhen:process_resident_memory_bytes", "")] == 4 * GIB


def test_an_engine_in_this_process_adds_its_allocator_figures():
    transformers_like = {
        "process_rss_bytes": 2 * GIB,
        "gpus": [
            {
                "index": 1,
                "used_bytes": 66 * GIB,
                "allocated_bytes": 64 * GIB,
                "reserved_bytes": 65 * GIB,
                "free_bytes": 14 * GIB,
                "total_bytes": 80 * GIB,
            }
        ],
    }
    values = samples(transformers_like)
    assert values[("shizhen:gpu_memory_used_bytes", "1")] == 66 * GIB
    assert values[("shizhen:gpu_memory_allocated_bytes", "1")] == 64 * GIB
    assert values[("shizhen:gpu_memory_reserved_bytes", "1")] == 65 * GIB
    assert values[("shizhen:process_resident_memory_bytes", "")] == 2 * GIB
