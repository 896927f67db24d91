"""The server's Prometheus metrics, in a registry of its own (not prometheus_client's global one), so that two apps
in one process, as in tests, never count into each other."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds per generation: a tiny folder on a CPU takes ~0.1 s, full-size SD1.5 on a 2-core CPU a minute or more
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    """Counters, the queue depth gauge and the latency histogram of one server."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: list[str]):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("lcmrt_queue_depth", "Requests waiting for a worker.", registry=self.registry)
        self.requests = Counter("lcmrt_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.generation_seconds = Histogram("lcmrt_generation_seconds", "Seconds a job ran (after its adapter "
                                            "switch, if any).", ["model"], buckets=LATENCY_BUCKETS,
                                            registry=self.registry)
        self.images = Counter("lcmrt_images_generated", "Images generated.", ["model"], registry=self.registry)
        self.adapter_swaps = Counter("lcmrt_adapter_swaps", "Adapter switches (refits) before a job.", ["model"],
                                     registry=self.registry)
        for model in models:  # every model's series exists from the start, at 0
            for metric in (self.generation_seconds, self.images, self.adapter_swaps):
                metric.labels(model)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
