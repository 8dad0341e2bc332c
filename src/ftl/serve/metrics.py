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
        self.computed = Gauge("ftl_computed_rows", "Rows the running generators compute at each step, finished "
                              "ones included (onnxruntime-genai cannot drop a row from a batch)", registry=registry)
        self.row_steps = Counter("ftl_row_steps", "Rows computed, summed over every generator step",
                                 registry=registry)
        self._row_steps_seen = 0
        self.batching = Gauge("ftl_batching", "1 when requests that arrive together share a generator; 0 when "
                              "onnxruntime-genai cannot batch this model, one request per generator",
                              registry=registry)
        self.batch = Histogram("ftl_batch_rows", "Requests per generator batch", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=registry)

    def finished(self, endpoint: str, job) -> None:
        self.requests.labels(endpoint, "200").inc()
        self.tokens.labels("prompt").inc(len(job.ids))
        self.tokens.labels("completion").inc(job.new_tokens)
        if job.first_token:
            self.ttft.observe(job.first_token - job.submitted)
        self.latency.observe(time.perf_counter() - job.submitted)

    def scrape(self, scheduler) -> None:
        """The scheduler's state, read when /metrics is asked for."""
        waiting, active = scheduler.depth()
        self.queue.set(waiting)
        self.active.set(active)
        self.computed.set(scheduler.computed())
        steps = scheduler.row_steps  # the scheduler's own count, brought up to date at each scrape
        self.row_steps.inc(steps - self._row_steps_seen)
        self._row_steps_seen = steps
        self.batching.set(1 if scheduler.batching else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
