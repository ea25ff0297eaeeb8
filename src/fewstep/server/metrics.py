"""Prometheus metrics, in a registry of the app's own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("fewstep_queue_depth", "Jobs waiting in the queue", registry=r)
        self.queue_limit = Gauge("fewstep_queue_limit", "Queue capacity", registry=r)
        self.running = Gauge("fewstep_jobs_running", "Jobs running now (one batch)", registry=r)
        self.batch_size = Histogram(
            "fewstep_batch_size", "Jobs run together in one pipeline call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.request_seconds = Histogram(
            "fewstep_request_seconds", "Time from arrival to response, per workflow",
            ["workflow"], buckets=BUCKETS, registry=r)
        self.generation_seconds = Histogram(
            "fewstep_generation_seconds", "Time the engine spent on a job, per workflow",
            ["workflow"], buckets=BUCKETS, registry=r)
        self.requests = Counter("fewstep_requests", "Generation requests by workflow and status",
                                ["workflow", "status"], registry=r)
        self.errors = Counter("fewstep_errors", "Errors by kind", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
