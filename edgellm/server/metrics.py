"""The server's Prometheus metrics (GET /metrics), in a registry of its own per app: requests by
endpoint and status, tokens, latency histograms per request and per token, and the engine's queue,
running rows and KV reuse read from the runtime at each scrape."""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Seconds: TTFT spans a cached prompt on a GPU (~ms) to a long prompt on a CPU (~s); inter-token
# latency spans a batch-1 GPU step (~1 ms) to a CPU step.
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_ITL_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, runtime: Callable[[], object]):
        """runtime(): the loaded LLMInferenceRuntime, or None while it loads."""
        self.registry = CollectorRegistry()
        self.requests = Counter("edgellm_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("edgellm_generation_tokens", "tokens generated for finished requests",
                                         registry=self.registry)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "request arrival to each choice's first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = _ManyHistogram("edgellm_inter_token_latency_seconds", "time between a choice's consecutive tokens",
                                  _ITL_BUCKETS)
        self.registry.register(self.itl)
        self.e2e = Histogram("edgellm_request_duration_seconds", "request arrival to its last token",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(runtime))

    def finished(self, response, arrival_ms: float) -> None:
        """Record a finished request's tokens and latencies. arrival_ms: how long before its submission
        the request arrived (parsing, tokenization)."""
        self.prompt_tokens.inc(sum(response.prompt_lengths))
        self.generation_tokens.inc(sum(len(ids) for ids in response.output_ids))
        last = 0.0
        for times in response.token_times_ms:
            if not times:
                continue
            self.ttft.observe((times[0] + arrival_ms) / 1e3)
            self.itl.observe_many((after - before) / 1e3 for before, after in zip(times, times[1:]))
            last = max(last, times[-1])
        self.e2e.observe((last + arrival_ms) / 1e3)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _ManyHistogram:
    """A histogram that takes a request's values in one call (its inter-token gaps: hundreds per request,
    which prometheus_client's Histogram would take one locked observe() each, on the event loop)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation, self.bounds = name, documentation, list(buckets)
        self._counts = [0] * (len(buckets) + 1)  # (the last: above every bound, +Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Iterable[float]) -> None:
        values = list(values)
        indices = [bisect.bisect_left(self.bounds, v) for v in values]  # (le: a value on a bound counts in it)
        with self._lock:
            for i, value in zip(indices, values):
                self._counts[i] += 1
                self._sum += value

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip(self.bounds + [float("inf")], counts):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)


class _EngineCollector:
    """Gauges and counters read from the runtime at scrape time (nothing to keep in step)."""

    def __init__(self, runtime: Callable[[], object]):
        self._runtime = runtime

    def describe(self):
        return []

    def collect(self):
        runtime = self._runtime()
        waiting = GaugeMetricFamily("edgellm_queue_depth", "sequences waiting for a KV slot")
        running = GaugeMetricFamily("edgellm_running_rows", "sequences holding a KV slot (prefilling or decoding)")
        steps = CounterMetricFamily("edgellm_engine_steps", "engine steps by kind", labels=["kind"])
        hits = CounterMetricFamily("edgellm_kv_reuse_block_hits", "saved KV blocks reused, by the tier they came from",
                                   labels=["tier"])
        looked = CounterMetricFamily("edgellm_kv_reuse_blocks_looked_up", "whole prompt blocks looked up")
        reused = CounterMetricFamily("edgellm_kv_reuse_tokens", "prompt tokens restored from saved KV blocks")
        if runtime is not None:
            stats = runtime.serving_stats()
            waiting.add_metric([], stats["waiting"])
            running.add_metric([], stats["running"])
            for kind, count in sorted(stats["steps"].items()):
                steps.add_metric([kind], count)
            if runtime.kv_store is not None:
                kv = runtime.kv_reuse_stats()
                for tier in ("gpu", "host", "disk"):
                    hits.add_metric([tier], getattr(kv, f"hits_{tier}"))
                looked.add_metric([], kv.blocks_looked_up)
                reused.add_metric([], kv.reused_tokens)
        yield from (waiting, running, steps, hits, looked, reused)
