"""Prometheus metrics (prefix llm_worker_), one registry per worker, updated where things happen.

Histogram buckets suit LLM latencies: time to first token from milliseconds to a minute, inter-token latency
from sub-millisecond (GPU batches) to a second (CPU under load).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_QUEUE = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
_REQUEST = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "llm_worker_"
        self.requests = Counter(p + "requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "HTTP request duration, streams included",
                                          ["route"], buckets=_REQUEST, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "submission to first generated token",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between generated tokens of a request",
                             buckets=_ITL, registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time a request waited for a slot", buckets=_QUEUE,
                                    registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of requests that got a slot", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "tokens generated", registry=r)
        self.finished = Counter(p + "requests_finished", "generations ended, by stop reason", ["stop_reason"],
                                registry=r)
        self.errors = Counter(p + "errors", "errors answered or streamed, by code", ["code"], registry=r)
        self.running = Gauge(p + "requests_running", "requests holding a slot", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "requests waiting for a slot", registry=r)
        self.slots = Gauge(p + "slots_total", "sequences decoded together (--parallel)", registry=r)
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "KV cache cells in use / all cells", registry=r)
        self.kv_pool_cells = Gauge(p + "kv_pool_cells", "KV cells of all slots (parallel x ctx-size)", registry=r)
        self.kv_pool_used = Gauge(p + "kv_pool_cells_used", "KV cells some slot holds (running, or kept for reuse)",
                                  registry=r)
        self.kv_pool_cached = Gauge(p + "kv_pool_cells_cached", "KV cells idle slots keep for the next prompts",
                                    registry=r)
        self.prefix_lookups = Counter(p + "prefix_cache_lookups", "requests that looked up their prompt's prefix",
                                      registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "lookups that found a cached prefix", registry=r)
        self.prefix_hit_tokens = Counter(p + "prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache "
                                         "instead of computed", registry=r)
        self.prefix_evictions = Counter(p + "prefix_cache_evictions", "times a slot dropped cached tokens for a new "
                                        "prompt", registry=r)
        self.prefix_evicted_cells = Counter(p + "prefix_cache_evicted_cells", "cached tokens dropped for new prompts",
                                            registry=r)
        self.ram_bytes = Gauge(p + "prefix_cache_ram_bytes", "bytes of KV state the host-memory tier keeps "
                               "(--cache-ram)", registry=r)
        self.ram_entries = Gauge(p + "prefix_cache_ram_entries", "sequences the host-memory tier keeps", registry=r)
        self.ram_saves = Counter(p + "prefix_cache_ram_saved", "sequences saved to host memory before a slot dropped "
                                 "them", registry=r)
        self.ram_restores = Counter(p + "prefix_cache_ram_restored", "sequences restored from host memory into a "
                                    "slot", registry=r)
        self.ram_restored_token_count = Counter(p + "prefix_cache_ram_restored_tokens", "prompt tokens restored "
                                                "from host memory instead of computed", registry=r)
        self.ram_evictions = Counter(p + "prefix_cache_ram_evicted", "sequences dropped from host memory (over the "
                                   "budget, held by a longer one, or refused by llama.cpp)", registry=r)
        self.spec_draft = Counter(p + "spec_draft_tokens", "tokens proposed by speculative decoding", registry=r)
        self.spec_accepted = Counter(p + "spec_accepted_tokens", "proposed tokens the model accepted", registry=r)
        self.load_seconds = Gauge(p + "model_load_seconds", "seconds the model took to load", registry=r)
        self.model_size = Gauge(p + "model_size_bytes", "size of the model file", registry=r)
        self.device_memory = Gauge(p + "device_memory_used_bytes", "memory in use on the GPU, as the backend "
                                   "reports it", ["device"], registry=r)
        self.model_info = Info(p + "model", "the model being served", registry=r)
        self.connections = Gauge(p + "http_connections", "HTTP connections open", registry=r)
        self.connections_closed = Counter(p + "http_connections_closed", "connections the worker closed or refused "
                                          "to guard itself, by reason (header_timeout, body_timeout, write_timeout, "
                                          "evicted, over_capacity)", ["reason"], registry=r)

    def bind_engine(self, *, slots: int, running: Callable[[], float], waiting: Callable[[], float],
                    kv_usage: Callable[[], float], kv_cells: Callable[[], tuple[int, int]],
                    kv_cells_total: int) -> None:
        """Gauges read at scrape time, so they are never stale."""
        self.slots.set(slots)
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_usage.set_function(kv_usage)
        self.kv_pool_cells.set(kv_cells_total)
        self.kv_pool_used.set_function(lambda: kv_cells()[0])
        self.kv_pool_cached.set_function(lambda: kv_cells()[1])

    def bind_host_cache(self, used: Callable[[], tuple[int, int]]) -> None:
        """The host-memory tier's (bytes, entries), read at scrape time."""
        self.ram_bytes.set_function(lambda: used()[0])
        self.ram_entries.set_function(lambda: used()[1])

    def bind_connections(self, count: Callable[[], int]) -> None:
        self.connections.set_function(count)

    def bind_device_memory(self, used: Callable[[], dict[str, int]]) -> None:
        """device_memory_used_bytes{device} read at scrape time from `used` (bytes per device)."""
        for name in used():
            self.device_memory.labels(device=name).set_function(partial(_used_on, used, name))

    # The engine's events (worker.engine.scheduler.SchedulerMetrics).

    def job_admitted(self, queue_wait_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.queue_wait.observe(queue_wait_s)
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_lookups.inc()
        if cached_tokens:
            self.prefix_hits.inc()
            self.prefix_hit_tokens.inc(cached_tokens)

    def token_generated(self, ttft_s: float | None, itl_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if itl_s is not None:
            self.itl.observe(itl_s)
        self.generated_tokens.inc()

    def job_finished(self, stop_reason: str) -> None:
        self.finished.labels(stop_reason=stop_reason).inc()

    def job_failed(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    def prefix_evicted(self, cells: int) -> None:
        self.prefix_evictions.inc()
        self.prefix_evicted_cells.inc(cells)

    def draft_verified(self, proposed: int, accepted: int) -> None:
        self.spec_draft.inc(proposed)
        self.spec_accepted.inc(accepted)

    def ram_saved(self, tokens: int, size: int) -> None:
        self.ram_saves.inc()

    def ram_restored(self, tokens: int) -> None:
        self.ram_restores.inc()
        self.ram_restored_token_count.inc(tokens)

    def ram_evicted(self, size: int) -> None:
        self.ram_evictions.inc()


def _used_on(used: Callable[[], dict[str, int]], device: str) -> float:
    return used().get(device, 0)
