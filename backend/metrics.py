"""Prometheus metrics at `/metrics`, named as vLLM names them so existing Grafana dashboards work.

Every series carries `model_name` (the served name). Each app has its own registry, so tests can build many
apps in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from backend.engines.events import Failed, Finished, GenerationEvent

if TYPE_CHECKING:
    from backend.engines import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class _MemoryCollector:
    """GPU memory per device (and the process RSS), read when Prometheus scrapes."""

    def __init__(self, model_name: str, engine: EngineClient) -> None:
        self._model_name = model_name
        self._engine = engine

    def collect(self):
        report = self._engine.memory()
        labels = ["model_name", "gpu"]
        used = GaugeMetricFamily("shizhen:gpu_memory_used_bytes", "GPU memory in use on the device", labels=labels)
        allocated = GaugeMetricFamily("shizhen:gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=labels)
        reserved = GaugeMetricFamily(
            "shizhen:gpu_memory_reserved_bytes", "GPU memory reserved by the allocator", labels=labels
        )
        total = GaugeMetricFamily("shizhen:gpu_memory_total_bytes", "GPU memory of the device", labels=labels)
        for gpu in report["gpus"]:
            key = [self._model_name, str(gpu["index"])]
            used.add_metric(key, gpu["used_bytes"])
            total.add_metric(key, gpu["total_bytes"])
            # Allocator figures exist only where the model lives in this process (the transformers engine).
            if "allocated_bytes" in gpu:
                allocated.add_metric(key, gpu["allocated_bytes"])
                reserved.add_metric(key, gpu["reserved_bytes"])
        rss = GaugeMetricFamily(
            "shizhen:process_resident_memory_bytes",
            "Resident memory of the server and its engine processes",
            labels=["model_name"],
        )
        rss.add_metric([self._model_name], report["process_rss_bytes"] + report.get("engine_core_rss_bytes", 0))
        return [used, allocated, reserved, total, rss]


class Metrics:
    """The server's series; `record` is fed every final generation event."""

    def __init__(self, model_name: str, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self._model = model_name
        self.running = Gauge(
            "vllm:num_requests_running", "Sequences in the running batch", labels, registry=self.registry
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting in the queue", labels, registry=self.registry
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens", labels, registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=self.registry)
        self.success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.failures = Counter(
            "shizhen:request_failure", "Requests that ended with an error", labels, registry=self.registry
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token (prefill)",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between two output tokens",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Queue + generation time",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time waiting in the queue",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._engine = engine
        self.registry.register(_MemoryCollector(model_name, engine))

    def record(self, event: GenerationEvent) -> None:
        """Count one final event (called on the inference thread; prometheus-client is thread-safe)."""
        model = self._model
        if isinstance(event, Failed):
            self.failures.labels(model).inc()
            return
        if not isinstance(event, Finished):
            return
        self.success.labels(model, event.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(event.prompt_tokens)
        self.generation_tokens.labels(model).inc(event.completion_tokens)
        self.queue_time.labels(model).observe(event.queue_seconds)
        self.e2e.labels(model).observe(event.queue_seconds + event.generation_seconds)
        if event.time_to_first_token is not None:
            self.ttft.labels(model).observe(event.time_to_first_token)
            if event.completion_tokens > 1:
                decode = event.generation_seconds - event.time_to_first_token
                self.inter_token.labels(model).observe(max(decode, 0.0) / (event.completion_tokens - 1))

    def render(self) -> bytes:
        """The exposition text, with the queue gauges read now."""
        running, waiting = self._engine.queue_sizes()
        self.running.labels(self._model).set(running)
        self.waiting.labels(self._model).set(waiting)
        return generate_latest(self.registry)
