"""Serving metrics, rendered in the Prometheus text exposition format (GET /metrics).

Updated by the batcher thread and the HTTP handlers under one lock. Realised keep per S and the
FLOP-ideal speed-up are counted from each finished request's cache lengths per level (after prefill
and at the end), with subllm/flops.py: the same counts `subllm generate --stats` prints.
"""

from __future__ import annotations

import collections
import threading
import time

from subllm.flops import flops_between, keep_counts

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0


class ServeMetrics:
    def __init__(self, n_subs: int, model_name: str = "subllm"):
        self._lock = threading.Lock()
        self.model_name = model_name
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()  # by finish reason
        self.rejected: collections.Counter[int] = collections.Counter()  # by HTTP status
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.kept = [0] * n_subs
        self.entered = [0] * n_subs
        self.flops = {"subllm": 0, "llama": 0}  # prefill + decode of finished requests
        self.running = self.waiting = self.kv_bytes = self.kv_allocated = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ---- updates ----------------------------------------------------------------------------
    def add_request(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] += 1

    def add_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected[status] += 1

    def add_prompt(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def add_generated(self, n: int, now: float) -> None:
        with self._lock:
            self.generated_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def add_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, b in enumerate(TTFT_BUCKETS):
                if seconds <= b:
                    self.ttft_buckets[i] += 1

    def add_finished(self, cfg, before: list[list[int]] | None, after: list[list[int]]) -> None:
        """A request left the batch: its row's per-level lengths after prefill and at the end."""
        if before is None:
            return
        zero = [[0] for _ in after]
        n_dec = after[0][0] - before[0][0]
        sub = flops_between(cfg, zero, before, 1) + flops_between(cfg, before, after, n_dec)
        lcfg = cfg.as_llama()
        llama = flops_between(lcfg, zero[:1], before[:1], 1) + flops_between(
            lcfg, before[:1], after[:1], n_dec
        )
        with self._lock:
            for i, (k, n) in enumerate(keep_counts(cfg, zero, after)):
                self.kept[i] += k
                self.entered[i] += n
            self.flops["subllm"] += sub
            self.flops["llama"] += llama

    def set_batch(self, running: int, waiting: int, kv_bytes: int, kv_allocated: int) -> None:
        with self._lock:
            self.running, self.waiting, self.kv_bytes, self.kv_allocated = (
                running,
                waiting,
                kv_bytes,
                kv_allocated,
            )

    # ---- rendering --------------------------------------------------------------------------
    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        with self._lock:
            n = sum(k for t, k in self._recent if t >= now - RATE_WINDOW_S)
        return n / RATE_WINDOW_S

    def render(self, queue_depth: int | None = None, prefix: dict | None = None) -> str:
        """`prefix`: the prefix store's counters (subllm/serve/prefix_cache.py `stats`), None: off."""
        rate = self.tokens_per_second()
        m = self.model_name
        out: list[str] = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in {"model": m, **labels}.items())
                out.append(f"{name}{{{lab}}} {_num(value)}")

        with self._lock:
            waiting = self.waiting if queue_depth is None else queue_depth
            metric(
                "subllm_requests_total",
                "counter",
                "Requests that ended, by finish reason (stop, length, cancelled, error).",
                [({"finish_reason": r}, n) for r, n in sorted(self.requests.items())],
            )
            metric(
                "subllm_requests_rejected_total",
                "counter",
                "Requests refused before generation, by HTTP status.",
                [({"status": s}, n) for s, n in sorted(self.rejected.items())],
            )
            metric("subllm_queue_depth", "gauge", "Requests waiting to join the batch.", [({}, waiting)])
            metric("subllm_running_batch", "gauge", "Rows in the running batch.", [({}, self.running)])
            metric(
                "subllm_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                [({}, self.prompt_tokens)],
            )
            metric(
                "subllm_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [({}, self.generated_tokens)],
            )
            metric(
                "subllm_generation_tokens_per_second",
                "gauge",
                f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
                [({}, rate)],
            )
            buckets = [({"le": _num(b)}, n) for b, n in zip(TTFT_BUCKETS, self.ttft_buckets)]
            buckets.append(({"le": "+Inf"}, self.ttft_count))
            out.append("# HELP subllm_time_to_first_token_seconds Arrival to first generated token.")
            out.append("# TYPE subllm_time_to_first_token_seconds histogram")
            for labels, n in buckets:
                lab = ",".join(f'{k}="{v}"' for k, v in {"model": m, **labels}.items())
                out.append(f"subllm_time_to_first_token_seconds_bucket{{{lab}}} {n}")
            out.append(f'subllm_time_to_first_token_seconds_sum{{model="{m}"}} {_num(self.ttft_sum)}')
            out.append(f'subllm_time_to_first_token_seconds_count{{model="{m}"}} {self.ttft_count}')
            metric(
                "subllm_keep_ratio",
                "gauge",
                "Realised keep per S (kept / entered tokens, prompts and generated, finished requests).",
                [
                    ({"s": i}, k / n if n else float("nan"))
                    for i, (k, n) in enumerate(zip(self.kept, self.entered))
                ],
            )
            metric(
                "subllm_keep_entered_tokens_total",
                "counter",
                "Tokens that reached each S (finished requests).",
                [({"s": i}, n) for i, n in enumerate(self.entered)],
            )
            metric(
                "subllm_keep_kept_tokens_total",
                "counter",
                "Tokens each S kept (finished requests).",
                [({"s": i}, n) for i, n in enumerate(self.kept)],
            )
            metric(
                "subllm_flops_total",
                "counter",
                "FLOPs of finished requests (prefill + decode) for this model and the same-size LLaMA.",
                [({"arch": a}, n) for a, n in self.flops.items()],
            )
            metric(
                "subllm_kv_cache_bytes",
                "gauge",
                "K/V bytes held by the running batch.",
                [({}, self.kv_bytes)],
            )
            metric(
                "subllm_kv_cache_allocated_bytes",
                "gauge",
                "K/V bytes allocated for the running batch (0 when idle).",
                [({}, self.kv_allocated)],
            )
            if prefix is not None:
                metric(
                    "subllm_prefix_cache_lookups_total",
                    "counter",
                    "Prefix store lookups of chunked prompts, by result (hit: a cached block prefix reused).",
                    [({"result": "hit"}, prefix["hits"]), ({"result": "miss"}, prefix["misses"])],
                )
                metric(
                    "subllm_prefix_cache_hit_tokens_total",
                    "counter",
                    "Prompt tokens taken from the prefix store instead of prefilled.",
                    [({}, prefix["hit_tokens"])],
                )
                metric(
                    "subllm_prefix_cache_bytes",
                    "gauge",
                    "Bytes held by the prefix store.",
                    [({}, prefix["bytes"])],
                )
        return "\n".join(out) + "\n"


def _num(v) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    return repr(float(v))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (for tests and the load benchmark)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
