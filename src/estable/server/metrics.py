"""Prometheus metrics (prometheus-client), one registry per app so that several apps can live in one process.

    estable_http_requests_total{route,method,status}     requests by route template and status
    estable_http_request_duration_seconds{route}         latency histogram
    estable_queue_depth                                  jobs waiting
    estable_jobs{state}                                  jobs in the store by state
    estable_images_generated_total                       images made since start
    estable_gpu_memory_bytes{device,kind}                torch's allocated / reserved CUDA memory
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Live(Collector):
    def __init__(self, jobs_by_state: Callable[[], dict[str, int]]):
        self._jobs = jobs_by_state

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("estable_jobs", "Jobs in the job store by state", labels=["state"])
        for state, n in self._jobs().items():
            jobs.add_metric([state], n)
        yield jobs
        gpu = GaugeMetricFamily("estable_gpu_memory_bytes", "CUDA memory held by torch", labels=["device", "kind"])
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                gpu.add_metric([f"cuda:{i}", "allocated"], torch.cuda.memory_allocated(i))
                gpu.add_metric([f"cuda:{i}", "reserved"], torch.cuda.memory_reserved(i))
        yield gpu


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], jobs_by_state: Callable[[], dict[str, int]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("estable_http_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("estable_http_request_duration_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("estable_images_generated", "Images generated", registry=r)
        self.queue = Gauge("estable_queue_depth", "Jobs waiting in the queue", registry=r)
        self.queue.set_function(lambda: float(queue_depth()))
        r.register(_Live(jobs_by_state))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
