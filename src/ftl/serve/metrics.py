"""``/metrics``: Prometheus text through prometheus_client, one registry per server."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# The *_created series (a timestamp per label set) only clutter a small server's page.
disable_created_metrics()

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ftl_requests", "Requests by endpoint and HTTP status (499: the client went away)",
                                ["endpoint", "status"], registry=registry)
        self.tokens = Counter("ftl_tokens", "Tokens by kind (prompt, completion)", ["kind"], registry=registry)
        self.queue = Gauge("ftl_queue_depth", "Requests waiting for a generation slot", registry=registry)
        self.active = Gauge("ftl_active_requests", "Requests generating now", registry=registry)
        self.ttft = Histogram("ftl_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_SECONDS, registry=registry)
        self.latency = Histogram("ftl_request_latency_seconds", "From arrival to the last token",
                                 buckets=_SECONDS, registry=registry)
        self.batch = Histogram("ftl_batch_rows", "Requests per generator batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=registry)

    def finished(self, endpoint: str, job) -> None:
        self.requests.labels(endpoint, "200").inc()
        self.tokens.labels("prompt").inc(len(job.ids))
        self.tokens.labels("completion").inc(job.new_tokens)
        if job.first_token:
            self.ttft.observe(job.first_token - job.submitted)
        self.latency.observe(time.perf_counter() - job.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
