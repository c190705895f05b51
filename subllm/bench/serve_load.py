"""The load generator of `subllm bench serve`: streamed greedy requests against one server, in a
closed loop (c clients, each sending its next request when its last one ended) or an open loop
with Poisson arrivals (requests sent at exponential inter-arrival times of mean 1 / rate,
whatever the server's progress - the queueing a real service sees). Client-side measurements:
time to first token, time per output token after the first, generated tokens per second."""

from __future__ import annotations

import asyncio
import json
import random
import time


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    i = int(k)
    return s[i] + (s[min(i + 1, len(s) - 1)] - s[i]) * (k - i)


def poisson_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds after the start) of n Poisson arrivals at `rate` requests/s; the first
    request is sent at 0. Seeded, so both models of a run see the same arrival pattern."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _one(client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, parts, usage, done, status = None, [], None, False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("choices") and obj["choices"][0]["text"]:
                    first = first or time.perf_counter()
                    parts.append(obj["choices"][0]["text"])
    except Exception as e:  # counted as a failed request
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    ok = status == 200 and done and n == max_tokens and first is not None
    return {
        "ok": ok,
        "start": t0,
        "end": t1,
        "ttft": (first or t1) - t0,
        "tokens": n,
        "prompt_tokens": len(prompt),
        "text": "".join(parts),
        "tpot": (t1 - first) / (n - 1) if ok and n > 1 else float("nan"),
        "status": status,
    }


def _client(n_connections: int):
    import httpx

    limits = httpx.Limits(max_connections=n_connections, max_keepalive_connections=n_connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits)


async def _closed_loop(url: str, prompts: list[list[int]], n: int, c: int, max_tokens: int) -> list[dict]:
    results: list[dict | None] = [None] * n
    nxt = iter(range(n))

    async def client_loop(client):
        for i in nxt:
            results[i] = await _one(client, url, prompts[i % len(prompts)], max_tokens)

    async with _client(c + 4) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
    return results


async def _open_loop(url: str, prompts: list[list[int]], offsets: list[float], max_tokens: int) -> list[dict]:
    async def send(client, i: int, t0: float):
        await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
        return await _one(client, url, prompts[i % len(prompts)], max_tokens)

    async with _client(len(offsets) + 4) as client:  # one connection per request in flight
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(send(client, i, t0) for i in range(len(offsets)))))


def run_level(
    url: str, prompts: list[list[int]], n: int, c: int, max_tokens: int, rate: float = 0.0, seed: int = 0
) -> dict:
    """n requests: closed loop with c clients, or (rate > 0) Poisson arrivals at `rate` req/s."""
    if rate > 0:
        res = asyncio.run(_open_loop(url, prompts, poisson_offsets(n, rate, seed), max_tokens))
    else:
        res = asyncio.run(_closed_loop(url, prompts, n, c, max_tokens))
    ok = [r for r in res if r["ok"]]
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok) if ok else float("nan")
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] == r["tpot"]]
    return {
        "mode": "poisson" if rate > 0 else "closed",
        "concurrency": c if rate <= 0 else None,
        "rate": rate if rate > 0 else None,
        "requests": n,
        "failed": len(res) - len(ok),
        "errors": sorted({r.get("error") or f"status {r.get('status')}" for r in res if not r["ok"]}),
        "generated_tokens": sum(r["tokens"] for r in ok),
        "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if ok else 0.0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p95_s": percentile(tpot, 95),
        "ttft_by_prompt_len": {
            str(n_p): percentile([r["ttft"] for r in ok if r["prompt_tokens"] == n_p], 50)
            for n_p in sorted({r["prompt_tokens"] for r in ok})
        },
        "texts": [r.get("text") for r in res],
    }
