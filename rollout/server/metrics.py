"""`ServerMetrics`: what GET /metrics reports (`--enable-metrics`), in Prometheus text format, with
SGLang's metric names so its dashboards and sglang-router's /engine_metrics read us unchanged.

The hot path pays little: per engine output of a request, a clock read and two integer additions;
histograms are observed once per request (time to first token when its first token arrives; end-to-end
latency and mean inter-token latency when it finishes). The scheduler's gauges (running / queued
requests, KV usage) are read from its live state when /metrics is scraped, never pushed per step.
Everything lives in one CollectorRegistry per server (no global state).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# SGLang's bucket bounds (seconds) for its latency histograms.
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 160.0)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
               0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0,
               200.0, 300.0, 400.0, 600.0, 1200.0, 1800.0, 2400.0)
UPDATE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Rates (throughput, cache hit rate) are over the time since the previous sample, taken at a scrape at
# most this often; a faster scrape sees the last sample's rates.
RATE_MIN_WINDOW_S = 1.0


class RequestClock:
    """One request's timestamps (time.monotonic), kept by the front end while the request runs."""

    __slots__ = ("start", "first", "last", "tokens")

    def __init__(self, start: float):
        self.start = start
        self.first = 0.0
        self.last = 0.0
        self.tokens = 0


class ServerMetrics:
    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self.registry = CollectorRegistry(auto_describe=True)
        names = ["model_name"]
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token, from the request's "
                              "arrival.", names, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "Mean time between a request's output tokens "
                             "(one observation per finished request).", names, buckets=ITL_BUCKETS,
                             registry=self.registry).labels(model_name)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency.", names,
                             buckets=E2E_BUCKETS, registry=self.registry).labels(model_name)
        self.update_seconds = Histogram("rollout:weight_update_seconds", "Seconds the engine spent applying one "
                                        "weight update (or one part of it).", names, buckets=UPDATE_BUCKETS,
                                        registry=self.registry).labels(model_name)
        # Plain integers on the hot path; the collector below reads them at scrape time.
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.finished_requests = 0
        self.weight_updates = 0
        self.weight_update_bytes = 0
        self.weight_version = ""
        self.state: dict[str, Any] = {}
        self._sample = (time.monotonic(), 0, 0, 0)   # (time, generation, prompt, cached tokens)
        self.gen_throughput = 0.0
        self.cache_hit_rate = 0.0
        self.registry.register(_StateCollector(self))

    # --- the front end's events -----------------------------------------------------------------

    @staticmethod
    def start_request(start: float) -> RequestClock:
        return RequestClock(start)

    def on_output(self, clock: RequestClock, num_new_tokens: int, finished: bool, prompt_tokens: int,
                  cached_tokens: int) -> None:
        if num_new_tokens:
            now = time.monotonic()
            if clock.tokens == 0:
                clock.first = now
                self.ttft.observe(now - clock.start)
            clock.last = now
            clock.tokens += num_new_tokens
            self.generation_tokens += num_new_tokens
        if finished:
            self.e2e.observe(time.monotonic() - clock.start)
            if clock.tokens > 1:
                self.itl.observe((clock.last - clock.first) / (clock.tokens - 1))
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.finished_requests += 1

    def on_weight_update(self, report: dict[str, Any]) -> None:
        """A successful update (or part), from the engine's ControlResult.report."""
        self.weight_updates += 1
        self.weight_update_bytes += int(report.get("num_bytes") or 0)
        self.update_seconds.observe(float(report.get("seconds") or 0.0))

    # --- scrape ---------------------------------------------------------------------------------

    def render(self, state: dict[str, Any], weight_version: str) -> bytes:
        """The exposition text, with the scheduler's live `state` (runtime/scheduler.py state())."""
        self.state = state
        self.weight_version = weight_version
        self._update_rates()
        return generate_latest(self.registry)

    def _update_rates(self) -> None:
        now = time.monotonic()
        then, gen, prompt, cached = self._sample
        if now - then < RATE_MIN_WINDOW_S:
            return
        self.gen_throughput = (self.generation_tokens - gen) / (now - then)
        if self.prompt_tokens > prompt:
            self.cache_hit_rate = (self.cached_tokens - cached) / (self.prompt_tokens - prompt)
        self._sample = (now, self.generation_tokens, self.prompt_tokens, self.cached_tokens)


class _StateCollector(Collector):
    """Counters kept as plain integers, and gauges from the scheduler's state at the last scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m, labels = self.m, list(self.m.labels)
        values = list(self.m.labels.values())

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        state = m.state
        yield counter("sglang:prompt_tokens", "Prompt tokens of finished requests.", m.prompt_tokens)
        yield counter("sglang:generation_tokens", "Generated tokens.", m.generation_tokens)
        yield counter("sglang:cached_tokens", "Prompt tokens read from the prefix cache.", m.cached_tokens)
        yield counter("sglang:num_requests", "Finished requests.", m.finished_requests)
        yield gauge("sglang:num_running_reqs", "Requests running (holding KV).", state.get("num_running_reqs", 0))
        yield gauge("sglang:num_queue_reqs", "Requests waiting in the queue.", state.get("num_waiting_reqs", 0))
        yield gauge("sglang:num_used_tokens", "KV slots in use (cached prefixes included).",
                    state.get("kv_used_tokens", 0))
        yield gauge("sglang:max_total_num_tokens", "KV pool size in tokens.", state.get("max_total_num_tokens", 0))
        yield gauge("sglang:token_usage", "Fraction of the KV pool held by requests (not evictable cache).",
                    state.get("token_usage", 0.0))
        yield gauge("sglang:cache_hit_rate", "Prompt tokens read from the prefix cache / prompt tokens, over "
                    "requests finished since the previous sample.", m.cache_hit_rate)
        yield gauge("sglang:gen_throughput", "Generated tokens per second since the previous sample.",
                    m.gen_throughput)
        yield counter("rollout:weight_updates", "Successful weight updates (each applied part counts).",
                      m.weight_updates)
        yield counter("rollout:weight_update_bytes", "Bytes of weights applied by updates.", m.weight_update_bytes)
        version = GaugeMetricFamily("rollout:weight_version", "The weights' current version (label); always 1.",
                                    labels=labels + ["weight_version"])
        version.add_metric(values + [m.weight_version], 1)
        yield version
