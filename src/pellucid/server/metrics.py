"""Prometheus text-format metrics for GET /metrics.

Counters and histograms are fed from the engine thread after every step (`observe_step`)
and by the HTTP layer; gauges (running, waiting, KV-cache use) are read at scrape time.
"""

from __future__ import annotations

import bisect
import resource
import threading
import time
from collections import defaultdict

# Bucket upper bounds, seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self, prefix: str) -> list[str]:
        n = f"{prefix}{self.name}"
        lines = [f"# HELP {n} {self.help}", f"# TYPE {n} histogram"]
        acc = 0
        for le, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            lines.append(f'{n}_bucket{{le="{le}"}} {acc}')
        lines.append(f'{n}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{n}_sum {self.sum:.6f}", f"{n}_count {self.count}"]
        return lines


class Metrics:
    """Everything /metrics shows; thread-safe."""

    prefix = "pellucid_"

    def __init__(self, model_name: str = ""):
        self.model_name = model_name
        self.lock = threading.Lock()
        self.started = time.time()
        self.ttft = Histogram("time_to_first_token_seconds", "Time from a request's arrival in the engine to its first output token.", TTFT_BUCKETS)
        self.itl = Histogram("time_per_output_token_seconds", "Time between two consecutive output tokens of one request.", TOKEN_BUCKETS)
        self.e2e = Histogram("request_latency_seconds", "Time from a generation request's arrival at the server to its last token.", LATENCY_BUCKETS)
        self.step = Histogram("engine_step_seconds", "Wall time of one engine step (one prefill chunk + one decode token for every running request).", TOKEN_BUCKETS)
        self.http: dict[tuple[str, int], int] = defaultdict(int)
        self.finish_reasons: dict[str, int] = defaultdict(int)
        self.requests_received = 0
        self._last_token: dict[str, float] = {}  # request id -> time of its last output
        self._ttft_seen = 0

    # -- fed by the engine thread ---------------------------------------------------------
    def observe_step(self, engine, outputs, seconds: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.step.observe(seconds)
            # The engine appends one TTFT per request; take the new ones and drop them there.
            new = engine.stats.ttft[:]
            del engine.stats.ttft[: len(new)]
            for v in new:
                self.ttft.observe(v)
            engine.stats.token_latency.clear()
            for o in outputs:
                prev = self._last_token.get(o.request_id)
                if prev is not None:
                    self.itl.observe(now - prev)
                if o.finished:
                    self._last_token.pop(o.request_id, None)
                    self.finish_reasons[o.finish_reason or "unknown"] += 1
                else:
                    self._last_token[o.request_id] = now
            if len(self._last_token) > 4 * engine.max_batch:  # aborted requests leave no final output
                live = engine.requests
                self._last_token = {k: v for k, v in self._last_token.items() if k in live}

    def forget(self, request_id: str) -> None:
        """An aborted request emits no final output: drop its inter-token clock."""
        with self.lock:
            self._last_token.pop(request_id, None)

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.e2e.observe(seconds)

    def count_http(self, path: str, status: int) -> None:
        with self.lock:
            self.http[(path, status)] += 1

    # -- the page ---------------------------------------------------------------------------
    def render(self, engine=None, *, loading: bool = False, async_engine=None) -> str:
        p = self.prefix
        out: list[str] = []

        def gauge(name: str, help: str, value, kind: str = "gauge") -> None:
            out.extend([f"# HELP {p}{name} {help}", f"# TYPE {p}{name} {kind}", f"{p}{name} {value}"])

        with self.lock:
            gauge("model_loaded", "1 once the model is loaded and serving, 0 while loading.", 0 if loading or engine is None else 1)
            gauge("uptime_seconds", "Seconds since the server started.", f"{time.time() - self.started:.1f}")
            ru = resource.getrusage(resource.RUSAGE_SELF)
            gauge("process_cpu_seconds_total", "CPU time of the server process (all threads).", f"{ru.ru_utime + ru.ru_stime:.3f}", "counter")
            # render() runs on the event loop's thread: its CPU time is the HTTP side's
            gauge("http_thread_cpu_seconds_total", "CPU time of the HTTP (event loop) thread.", f"{time.thread_time():.3f}", "counter")
            if async_engine is not None:
                gauge("engine_busy_seconds_total", "Wall time the engine thread spent in steps.", f"{async_engine.busy_seconds:.3f}", "counter")
                gauge("engine_cpu_seconds_total", "CPU time the engine thread spent in steps.", f"{async_engine.cpu_seconds:.3f}", "counter")
            if engine is not None:
                st = engine.stats
                waiting = sum(1 for r in list(engine.waiting) if not r.finished)
                running = list(engine.running)
                gauge("requests_running", "Requests in the running batch (prefilling or decoding).", len(running))
                gauge("requests_waiting", "Requests queued for a free batch slot.", waiting)
                gauge("max_batch", "Batch slots (requests that can run at once).", engine.max_batch)
                gauge("requests_finished_total", "Requests that finished (stop or length).", st.requests_finished, "counter")
                gauge("requests_aborted_total", "Requests aborted (client disconnected or cancelled).", st.requests_aborted, "counter")
                gauge("prompt_tokens_total", "Prompt tokens prefilled.", st.prompt_tokens, "counter")
                gauge("generation_tokens_total", "Output tokens generated.", st.generated_tokens, "counter")
                gauge("engine_steps_total", "Engine steps run.", st.steps, "counter")
                cache = engine.cache
                if cache is not None:
                    used = cache.used - cache.held_tokens
                    gauge("kv_cache_usage_ratio", "Fraction of the KV-cache budget holding running requests' tokens.", f"{used / cache.budget:.6f}")
                    gauge("kv_cache_used_tokens", "KV-cache token positions held by running requests.", used)
                    gauge("kv_cache_held_tokens", "KV-cache token positions kept from finished requests for reuse.", cache.held_tokens)
                    gauge("kv_cache_capacity_tokens", "KV-cache budget, token positions shared by all requests.", cache.budget)
                    gauge("kv_cache_slots_used", "KV-cache slots held by requests.", cache.used_slots)
                    gauge("kv_cache_bytes", "Bytes of memory the KV cache holds.", cache.nbytes)
                    gauge("requests_preempted_total", "Requests taken out of the batch when the KV cache was full (computed again later).", st.preempted, "counter")
                    gauge("prefix_cache_enabled", "1 when prompts reuse the cached keys and values of earlier ones.", int(engine.prefix_cache))
                    gauge("prefix_cache_queries_tokens_total", "Prompt tokens looked up in the prefix cache.", st.prefix_query_tokens, "counter")
                    gauge("prefix_cache_hits_tokens_total", "Prompt tokens found in the prefix cache (not computed again).", st.prefix_hit_tokens, "counter")
                    rate = st.prefix_hit_tokens / st.prefix_query_tokens if st.prefix_query_tokens else 0.0
                    gauge("prefix_cache_hit_ratio", "Prefix-cache hits / queries, in prompt tokens, since the start.", f"{rate:.6f}")
                    gauge("prefix_cache_held_slots", "Free KV-cache slots holding an earlier request's tokens for reuse.", len(cache.held))
            out.append(f"# HELP {p}requests_received_total Generation requests accepted by the HTTP layer.")
            out.append(f"# TYPE {p}requests_received_total counter")
            out.append(f"{p}requests_received_total {self.requests_received}")
            out.append(f"# HELP {p}request_finish_total Finished requests by finish reason.")
            out.append(f"# TYPE {p}request_finish_total counter")
            for reason, n in sorted(self.finish_reasons.items()):
                out.append(f'{p}request_finish_total{{reason="{reason}"}} {n}')
            out.append(f"# HELP {p}http_requests_total HTTP requests by path and status.")
            out.append(f"# TYPE {p}http_requests_total counter")
            for (path, status), n in sorted(self.http.items()):
                out.append(f'{p}http_requests_total{{path="{_esc(path)}",status="{status}"}} {n}')
            for h in (self.ttft, self.itl, self.e2e, self.step):
                out.extend(h.render(p))
        return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, float]:
    """{'name{labels}': value} from a Prometheus text page (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
