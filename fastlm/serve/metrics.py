"""Prometheus metrics of the server (prometheus-client, one registry per app).

Counted by the server as outputs reach the event loop: prompt and generation tokens, finished
choices by finish reason ("abort" when the client left), time to first token, inter-token latency.
Read from the engine at each scrape: running and waiting sequences, KV blocks used and total,
prefix-cache hit tokens, preemptions, sequences aborted in the engine.
"""
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = registry = CollectorRegistry()
        self.prompt_tokens = Counter("fastlm_prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generation_tokens = Counter("fastlm_generation_tokens", "Generated tokens sent to clients",
                                         registry=registry)
        self.finished = Counter("fastlm_requests_finished", "Finished choices (each of a request's n) by reason",
                                ["finish_reason"], registry=registry)
        self.in_flight = Gauge("fastlm_requests_in_flight", "Requests accepted and not yet answered in full",
                               registry=registry)
        self.rejected = Counter("fastlm_requests_rejected", "Requests refused with 503 (waiting queue full)",
                                registry=registry)
        self.ttft = Histogram("fastlm_time_to_first_token_seconds", "Time from request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("fastlm_inter_token_latency_seconds", "Time between consecutive tokens of a choice",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's counters at scrape time (plain reads of its bookkeeping; no torch)."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        for name, key, doc in (("fastlm_requests_running", "running", "Sequences running (holding KV blocks)"),
                               ("fastlm_requests_waiting", "waiting", "Sequences waiting to be scheduled"),
                               ("fastlm_kv_blocks_total", "kv_blocks_total", "KV blocks in the pool")):
            yield GaugeMetricFamily(name, doc, value=stats[key])
        used = stats["kv_blocks_total"] - stats["kv_blocks_free"]
        yield GaugeMetricFamily("fastlm_kv_blocks_used", "KV blocks held by sequences", value=used)
        yield CounterMetricFamily("fastlm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=stats["prefix_cache_hit_tokens"])
        yield CounterMetricFamily("fastlm_preemptions", "Sequences preempted (recomputed later)",
                                  value=stats["preemptions"])
        yield CounterMetricFamily("fastlm_engine_aborted_sequences", "Sequences the engine stopped on an abort "
                                  "(a client that left)", value=stats.get("aborted_sequences", 0))
