"""`subllm bench serve`: a bounded load test of `subllm serve` on loopback, SUBLLM vs the same-size
LLaMA side by side in one run.

    subllm bench serve --checkpoints runs/demo/subllm,runs/demo/llama \\
        --text data/corpus/val/shakespeare_hamlet.txt --prompt-tokens 1024 --max-tokens 128

Each checkpoint is served by its own `subllm serve` process (started here, same settings, all up
at once; the models take turns, in alternating order from one level to the next). For each
concurrency c (closed loop: c clients, each sending its next request as soon as
the last one ended) a fixed number of streamed greedy requests is sent; prompt i is the i-th
consecutive `--prompt-tokens` window of the validation text (token ids, the checkpoint's
tokenizer), the same prompts at every concurrency and for every model; eos is ignored so every
request generates exactly --max-tokens tokens. Measured on the client side: generated tokens/s
(all tokens / wall time of the level), time to first token (send -> first streamed token) and
per-token latency (time per output token after the first, per request), p50 / p95.

Checks: zero failed requests; every output equals the same prompt's output at concurrency 1 (the
server then runs each request alone, i.e. the solo `generate()` computation - and `--verify K`
compares the first K with an in-process `generate()`); after the test the server holds no running
row and no KV-cache bytes. The FLOP-ideal speed-up for the keep the checkpoint realised comes from
the SUBLLM server's /metrics (prefill + decode FLOPs of every finished request vs the same-size
LLaMA, subllm/flops.py). Prints a table, then ONE JSON line last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from subllm.bench.common import format_table
from subllm.errors import SubLLMError


def add_serve_arguments(sub) -> None:
    p = sub.add_parser("serve", help="load test of `subllm serve`: SUBLLM vs LLaMA under concurrent requests")
    p.add_argument(
        "--checkpoints",
        default="runs/demo/subllm,runs/demo/llama",
        help="comma-separated checkpoint folders, each served by its own process (SUBLLM first, then LLaMA)",
    )
    p.add_argument(
        "--text", required=True, help="validation text file: prompts are consecutive windows of it"
    )
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated closed-loop client counts")
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency (default max(4, 2c))")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto (default): fp32 on a CPU"
    )
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument(
        "--verify", type=int, default=1, help="compare the first K outputs with in-process generate()"
    )


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    i = int(k)
    return s[i] + (s[min(i + 1, len(s) - 1)] - s[i]) * (k - i)


# ---- one server -------------------------------------------------------------------------------
class ServerProcess:
    """`subllm serve` on a free loopback port, in its own process."""

    def __init__(self, checkpoint: str, max_batch: int, dtype: str, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        cmd = [
            sys.executable,
            "-m",
            "subllm",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--max-queue",
            "4096",
            "--dtype",
            dtype,
            "--threads",
            str(threads),
            "--model-name",
            Path(checkpoint).name,
        ]
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "listening on http://" not in line:
            self.proc.kill()
            raise SubLLMError(f"`{' '.join(cmd)}` did not start: {line}{self.proc.stderr.read()}")
        self.banner = line.strip()
        self.url = line.rsplit(" ", 1)[1].strip()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metrics(self) -> dict[str, float]:
        import httpx

        from subllm.serve.metrics import parse_metrics

        return parse_metrics(httpx.get(self.url + "/metrics", timeout=30).text)

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """/metrics once no row runs and nothing waits (+ a moment for the idle memory release)."""
        deadline = time.monotonic() + timeout
        while True:
            met = self.metrics()
            busy = sum(
                v for k, v in met.items() if k.startswith(("subllm_running_batch", "subllm_queue_depth"))
            )
            if not busy or time.monotonic() > deadline:
                time.sleep(0.5)
                return self.metrics()
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---- the load generator -----------------------------------------------------------------------
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
        "text": "".join(parts),
        "tpot": (t1 - first) / (n - 1) if ok and n > 1 else float("nan"),
        "status": status,
    }


async def _closed_loop(url: str, prompts: list[list[int]], n: int, c: int, max_tokens: int) -> list[dict]:
    import httpx

    results: list[dict | None] = [None] * n
    nxt = iter(range(n))

    async def client_loop(client):
        for i in nxt:
            results[i] = await _one(client, url, prompts[i % len(prompts)], max_tokens)

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(c)))
    return results


def run_level(url: str, prompts: list[list[int]], n: int, c: int, max_tokens: int) -> dict:
    res = asyncio.run(_closed_loop(url, prompts, n, c, max_tokens))
    ok = [r for r in res if r["ok"]]
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok) if ok else float("nan")
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] == r["tpot"]]
    return {
        "concurrency": c,
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
        "texts": [r.get("text") for r in res],
    }


def prompt_windows(
    text_file: str, checkpoint: str, length: int, count: int, vocab_size: int
) -> list[list[int]]:
    from subllm.bench.infer import load_text_tokens

    ids = load_text_tokens(text_file, checkpoint, vocab_size)
    if len(ids) < length * count:
        raise SubLLMError(f"--text has {len(ids)} tokens; {count} prompts of {length} need {length * count}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def verify_solo(
    checkpoint: str, prompts: list[list[int]], texts: list[str], max_tokens: int, dtype: str
) -> int:
    """How many of `texts` differ from an in-process greedy generate() of their prompt (chunked as
    the server prefills it: subllm/serve/prefill.py)."""
    import torch

    from subllm.data.tokenizer import load_tokenizer
    from subllm.dtype import autocast
    from subllm.inference.generation import generate
    from subllm.model.subllm import SubLLM
    from subllm.serve.prefill import DEFAULT_PREFILL_CHUNK, solo_prefill_chunk

    model = SubLLM.from_pretrained(checkpoint).eval()
    tok = load_tokenizer(Path(checkpoint))
    bad = 0
    for p, t in zip(prompts, texts):
        with autocast(dtype):
            chunk = solo_prefill_chunk(len(p), DEFAULT_PREFILL_CHUNK)
            out = generate(model, torch.tensor([p]), max_new_tokens=max_tokens, eos_token_id=None,
                           prefill_chunk=chunk)  # fmt: skip
        bad += tok.decode(out[0, len(p) :].tolist(), skip_special_tokens=True) != t
    return bad


# ---- the whole benchmark ----------------------------------------------------------------------
def run_serve_bench(args, log=print) -> dict:
    from subllm.bench.common import int_list
    from subllm.dtype import resolve_dtype

    ckpts = [c for c in args.checkpoints.split(",") if c]
    levels = int_list(args.concurrency)
    if args.prompt_tokens < 1 or args.max_tokens < 2 or args.requests < 0 or args.verify < 0:
        raise SubLLMError("--prompt-tokens >= 1, --max-tokens >= 2, --requests and --verify >= 0")
    for c in ckpts:
        if not (Path(c) / "config.json").is_file():
            raise SubLLMError(f"no checkpoint at {c} (config.json missing)")
    dtype = resolve_dtype(args.dtype, "cpu", "decode")
    count = {c: args.requests or max(4, 2 * c) for c in levels}
    n_prompts = max(count.values())
    out = {"dtype": dtype, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "models": []}
    prompts = [prompt_windows(args.text, ck, args.prompt_tokens, n_prompts, _vocab(ck)) for ck in ckpts]
    servers: list[ServerProcess] = []
    models: list[dict] = []
    refs: list[list | None] = [None] * len(ckpts)
    try:
        for ck in ckpts:  # all up at once; an idle server costs nothing, so levels can alternate
            log(f"starting `subllm serve` for {ck} ...")
            servers.append(ServerProcess(ck, args.max_batch, dtype, args.server_threads))  # = the check's
        for i, srv in enumerate(servers):
            run_level(srv.url, prompts[i][:1], 1, 1, 2)  # warm-up (untimed)
            models.append(
                {"checkpoint": ckpts[i], "server": srv.banner, "levels": [], "rss_idle_mb": srv.rss_mb()}
            )
        order = list(range(len(ckpts)))
        for j, c in enumerate(levels):  # A B at one level, B A at the next: drift hits both alike
            for i in order if j % 2 == 0 else order[::-1]:
                log(f"  {Path(ckpts[i]).name}, concurrency {c}: {count[c]} requests")
                lv = run_level(servers[i].url, prompts[i], count[c], c, args.max_tokens)
                texts = lv.pop("texts")
                if refs[i] is None:
                    refs[i] = texts  # the first level's outputs (concurrency 1: each request alone)
                lv["mismatched"] = sum(
                    t != refs[i][k] for k, t in enumerate(texts[: len(refs[i])]) if t is not None
                )
                models[i]["levels"].append(lv)
        for m, srv in zip(models, servers):
            met, name = srv.wait_idle(), Path(m["checkpoint"]).name
            m["rss_after_mb"] = srv.rss_mb()
            m["idle_after"] = {
                "running": met.get(f'subllm_running_batch{{model="{name}"}}'),
                "kv_cache_allocated_bytes": met.get(f'subllm_kv_cache_allocated_bytes{{model="{name}"}}'),
            }
            m["keep"] = [v for k, v in sorted(met.items()) if k.startswith("subllm_keep_ratio")]
            sub, llama = (
                met.get(f'subllm_flops_total{{model="{name}",arch="{a}"}}') for a in ("subllm", "llama")
            )
            m["flop_ideal_speedup"] = llama / sub if sub else float("nan")
    finally:
        for i, srv in enumerate(servers):
            code = srv.stop()
            if i < len(models):
                models[i]["exit_code"] = code
    for i, m in enumerate(models):
        if args.verify:
            m["verify_mismatched"] = verify_solo(
                ckpts[i], prompts[i][: args.verify], refs[i][: args.verify], args.max_tokens, dtype
            )
        out["models"].append(m)
    out["summary"] = summarize(out)
    return out


def _vocab(ck: str) -> int:
    return json.loads((Path(ck) / "config.json").read_text())["vocab_size"]


def summarize(out: dict) -> dict:
    """Targets of issue 14, for the first checkpoint (SUBLLM) against the second (LLaMA)."""
    s: dict = {}
    for i, m in enumerate(out["models"]):
        lv = m["levels"]
        s[f"model{i}"] = {
            "checkpoint": m["checkpoint"],
            "c_max_over_c1": lv[-1]["tokens_per_s"] / lv[0]["tokens_per_s"] if lv[0]["tokens_per_s"] else 0,
        }
    ms = out["models"]
    s["zero_failed"] = all(lv["failed"] == 0 for m in ms for lv in m["levels"])
    s["zero_mismatched"] = all(lv["mismatched"] == 0 for m in ms for lv in m["levels"]) and all(
        m.get("verify_mismatched", 0) == 0 for m in ms
    )
    s["idle_after"] = all(
        m["idle_after"]["running"] == 0 and m["idle_after"]["kv_cache_allocated_bytes"] == 0 for m in ms
    )
    s["rss_back_to_idle"] = all(m["rss_after_mb"] <= 1.1 * m["rss_idle_mb"] for m in ms)  # within 10%
    if len(ms) >= 2:
        a, b = ms[0]["levels"][-1], ms[1]["levels"][-1]
        speed = a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else float("nan")
        ideal = ms[0]["flop_ideal_speedup"]
        s["speedup_at_c_max"] = speed
        s["flop_ideal_speedup"] = ideal
        s["gain_fraction_of_ideal"] = (speed - 1) / (ideal - 1) if ideal > 1 else float("nan")
        s["speedup_over_ideal"] = speed / ideal if ideal else float("nan")
        s["p95_tpot_lower"] = a["tpot_p95_s"] < b["tpot_p95_s"]
    return s


def print_serve_report(out: dict, file=None) -> None:
    file = file or sys.stdout
    rows = []
    for m in out["models"]:
        for lv in m["levels"]:
            rows.append(
                [
                    Path(m["checkpoint"]).name,
                    lv["concurrency"],
                    lv["requests"],
                    f"{lv['tokens_per_s']:.1f}",
                    f"{lv['ttft_p50_s'] * 1e3:.0f}",
                    f"{lv['ttft_p95_s'] * 1e3:.0f}",
                    f"{lv['tpot_p50_s'] * 1e3:.1f}",
                    f"{lv['tpot_p95_s'] * 1e3:.1f}",
                    lv["failed"],
                    lv["mismatched"],
                ]
            )
    headers = [
        "model",
        "conc",
        "reqs",
        "gen tok/s",
        "TTFT p50 ms",
        "TTFT p95 ms",
        "TPOT p50 ms",
        "TPOT p95 ms",
        "failed",
        "differ",
    ]
    print(
        f"prompts {out['prompt_tokens']} tokens, {out['max_tokens']} generated each, {out['dtype']}",
        file=file,
    )
    print(format_table(headers, rows), file=file)
    for m in out["models"]:
        keep = ", ".join(f"{k:.3f}" for k in m["keep"]) or "-"
        print(
            f"{Path(m['checkpoint']).name}: keep per S {keep}; FLOP-ideal speed-up vs LLaMA "
            f"{m['flop_ideal_speedup']:.3f}x; RSS idle {m['rss_idle_mb']:.0f} MB -> "
            f"after {m['rss_after_mb']:.0f} MB; "
            f"after the test: {m['idle_after']}; vs in-process generate(): "
            f"{m.get('verify_mismatched', '-')} differ; exit {m['exit_code']}",
            file=file,
        )
    print("summary: " + json.dumps(out["summary"], default=str), file=file)
