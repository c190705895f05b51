"""`subllm bench serve`: a bounded load test of `subllm serve` on loopback, SUBLLM vs the same-size
LLaMA side by side in one run.

    subllm bench serve --checkpoints runs/demo/subllm,runs/demo/llama \\
        --text data/corpus/val/shakespeare_hamlet.txt --prompt-tokens 1024 --max-tokens 128

Each checkpoint is served by its own `subllm serve` process (started here, same settings, all up
at once; the models take turns, in alternating order from one level to the next). For each
concurrency c (closed loop: c clients, each sending its next request as soon as
the last one ended), then for each `--rates` level (open loop: Poisson arrivals at that many
requests/s, seeded, the same send times for every model) a fixed number of streamed greedy
requests is sent; prompt i is the i-th consecutive window of the validation text (token ids, the
checkpoint's tokenizer) of `--prompt-tokens` tokens - a comma list mixes lengths, prompt i taking
the i-th cyclically - the same prompts at every level and for every model; eos is ignored so every
request generates exactly --max-tokens tokens. Measured on the client side: generated tokens/s
(all tokens / wall time of the level), time to first token (send -> first streamed token) and
per-token latency (time per output token after the first, per request), p50 / p95; with mixed
lengths also the TTFT p50 of each prompt length.

Checks: zero failed requests; every output equals the same prompt's output at concurrency 1 (the
server then runs each request alone, i.e. the solo `generate()` computation - and `--verify K`
compares the first K with an in-process `generate()`); after the test the server holds no running
row and no KV-cache bytes. The FLOP-ideal speed-up for the keep the checkpoint realised comes from
the SUBLLM server's /metrics (prefill + decode FLOPs of every finished request vs the same-size
LLaMA, subllm/flops.py). Prints a table, then ONE JSON line last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import accumulate
from pathlib import Path

from subllm.bench.common import format_table
from subllm.bench.serve_load import run_level
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
    p.add_argument(
        "--prompt-tokens",
        default="1024",
        help="prompt length in tokens (default 1024); a comma list mixes lengths, cyclically",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated closed-loop client counts")
    p.add_argument(
        "--rates",
        default="",
        help="comma-separated Poisson arrival rates (requests/s): open-loop levels after the closed ones",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times (default 0)")
    p.add_argument(
        "--requests", type=int, default=0, help="requests per level (default max(4, 2c); 8 per rate)"
    )
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto (default): fp32 on a CPU"
    )
    p.add_argument(
        "--prefill-dtype", default="same", choices=["same", "bf16"],
        help="the servers' --prefill-dtype (and the verification's): bf16 prompts under an fp32 decode",
    )  # fmt: skip
    p.add_argument(
        "--prefill-batch", type=int, default=1,
        help="the servers' --prefill-batch: waiting one-pass prompts prefilled together (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--kv-dtype", default="same", choices=["same", "bf16"],
        help="the servers' --kv-dtype (and the verification's): bf16 K/V halves what a decode step reads",
    )  # fmt: skip
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of each server (default 1)")
    p.add_argument(
        "--verify", type=int, default=1, help="compare the first K outputs with in-process generate()"
    )


# ---- one server -------------------------------------------------------------------------------
class ServerProcess:
    """`subllm serve` on a free loopback port, in its own process."""

    def __init__(
        self, checkpoint: str, max_batch: int, dtype: str, threads: int, prefill_dtype="same",
        prefill_batch=1, kv_dtype="same",
    ):  # fmt: skip
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
            "--prefill-dtype",
            prefill_dtype,
            "--prefill-batch",
            str(prefill_batch),
            "--kv-dtype",
            kv_dtype,
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


def prompt_windows(
    text_file: str, checkpoint: str, lengths: list[int], count: int, vocab_size: int
) -> list[list[int]]:
    """`count` consecutive windows of the text; window i has lengths[i % len(lengths)] tokens."""
    from subllm.bench.infer import load_text_tokens

    ids = load_text_tokens(text_file, checkpoint, vocab_size)
    sizes = [lengths[i % len(lengths)] for i in range(count)]
    if len(ids) < sum(sizes):
        raise SubLLMError(f"--text has {len(ids)} tokens; {count} prompts of {lengths} need {sum(sizes)}")
    return [ids[end - n : end] for end, n in zip(accumulate(sizes), sizes)]


def verify_solo(
    checkpoint: str, prompts: list[list[int]], texts: list[str], max_tokens: int, dtype: str,
    prefill_dtype: str | None = None, kv_dtype: str = "same",
) -> int:  # fmt: skip
    """How many of `texts` differ from an in-process greedy generate() of their prompt (chunked as
    the server prefills it: subllm/serve/prefill.py)."""
    import torch

    from subllm.data.tokenizer import load_tokenizer
    from subllm.dtype import autocast
    from subllm.inference.engine import set_kv_dtype
    from subllm.inference.generation import generate
    from subllm.model.subllm import SubLLM
    from subllm.serve.prefill import DEFAULT_PREFILL_CHUNK, solo_prefill_chunk

    model = set_kv_dtype(SubLLM.from_pretrained(checkpoint).eval(), kv_dtype)
    tok = load_tokenizer(Path(checkpoint))
    bad = 0
    for p, t in zip(prompts, texts):
        with autocast(dtype):
            chunk = solo_prefill_chunk(len(p), DEFAULT_PREFILL_CHUNK)
            out = generate(model, torch.tensor([p]), max_new_tokens=max_tokens, eos_token_id=None,
                           prefill_chunk=chunk, prefill_dtype=prefill_dtype)  # fmt: skip
        bad += tok.decode(out[0, len(p) :].tolist(), skip_special_tokens=True) != t
    return bad


# ---- the whole benchmark ----------------------------------------------------------------------
def run_serve_bench(args, log=print) -> dict:
    from subllm.bench.common import int_list
    from subllm.cli.generate import resolve_prefill_dtype
    from subllm.dtype import resolve_dtype

    ckpts = [c for c in args.checkpoints.split(",") if c]
    lengths = int_list(str(args.prompt_tokens))
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise SubLLMError(f"--rates takes comma-separated numbers (requests/s), got {args.rates!r}") from None
    levels = [(c, 0.0) for c in (int_list(args.concurrency) if args.concurrency else [])]
    levels += [(0, r) for r in rates]
    if min(lengths) < 1 or args.max_tokens < 2 or args.requests < 0 or args.verify < 0:
        raise SubLLMError("--prompt-tokens >= 1, --max-tokens >= 2, --requests and --verify >= 0")
    if not levels or any(r <= 0 for r in rates) or any(c < 1 for c, r in levels if not r):
        raise SubLLMError("give at least one --concurrency (>= 1) or --rates (> 0) level")
    for c in ckpts:
        if not (Path(c) / "config.json").is_file():
            raise SubLLMError(f"no checkpoint at {c} (config.json missing)")
    dtype = resolve_dtype(args.dtype, "cpu", "decode")
    count = {lv: args.requests or (8 if lv[1] else max(4, 2 * lv[0])) for lv in levels}
    n_prompts = max(count.values())
    out = {"dtype": dtype, "prefill_dtype": args.prefill_dtype, "prefill_batch": args.prefill_batch,
           "kv_dtype": args.kv_dtype,
           "prompt_tokens": lengths,
           "max_tokens": args.max_tokens, "models": []}  # fmt: skip
    prompts = [prompt_windows(args.text, ck, lengths, n_prompts, _vocab(ck)) for ck in ckpts]
    servers: list[ServerProcess] = []
    models: list[dict] = []
    refs: list[list | None] = [None] * len(ckpts)
    try:
        for ck in ckpts:  # all up at once; an idle server costs nothing, so levels can alternate
            log(f"starting `subllm serve` for {ck} ...")
            servers.append(  # the dtypes = the check's
                ServerProcess(
                    ck,
                    args.max_batch,
                    dtype,
                    args.server_threads,
                    args.prefill_dtype,
                    args.prefill_batch,
                    args.kv_dtype,
                )  # fmt: skip
            )
        for i, srv in enumerate(servers):
            run_level(srv.url, prompts[i][:1], 1, 1, 2)  # warm-up (untimed)
            models.append(
                {"checkpoint": ckpts[i], "server": srv.banner, "levels": [], "rss_idle_mb": srv.rss_mb()}
            )
        order = list(range(len(ckpts)))
        for j, (c, rate) in enumerate(levels):  # A B at one level, B A at the next: drift hits both alike
            for i in order if j % 2 == 0 else order[::-1]:
                load = f"Poisson arrivals at {rate:g}/s" if rate else f"concurrency {c}"
                log(f"  {Path(ckpts[i]).name}, {load}: {count[c, rate]} requests")
                lv = run_level(
                    servers[i].url, prompts[i], count[c, rate], c, args.max_tokens, rate, args.seed + j
                )
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
                ckpts[i], prompts[i][: args.verify], refs[i][: args.verify], args.max_tokens, dtype,
                resolve_prefill_dtype(args.prefill_dtype, None, dtype),  # as the servers resolve it
                args.kv_dtype,
            )  # fmt: skip
        out["models"].append(m)
    out["summary"] = summarize(out)
    return out


def _vocab(ck: str) -> int:
    return json.loads((Path(ck) / "config.json").read_text())["vocab_size"]


def _load(lv: dict) -> str:
    """A level's load in the report: c=4 (closed loop) or 0.5/s (Poisson arrivals)."""
    return f"c={lv['concurrency']}" if lv["mode"] == "closed" else f"{lv['rate']:g}/s"


def _closed(m: dict) -> list[dict]:
    """A model's closed-loop levels (all its levels when it has only Poisson ones)."""
    return [lv for lv in m["levels"] if lv["mode"] == "closed"] or m["levels"]


def summarize(out: dict) -> dict:
    """Targets of issue 14, for the first checkpoint (SUBLLM) against the second (LLaMA)."""
    s: dict = {}
    for i, m in enumerate(out["models"]):
        lv = _closed(m)
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
        a, b = _closed(ms[0])[-1], _closed(ms[1])[-1]
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
                    _load(lv),
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
        "load",
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
        f"prompts {','.join(map(str, out['prompt_tokens']))} tokens, {out['max_tokens']} generated each, "
        f"{out['dtype']}",
        file=file,
    )
    print(format_table(headers, rows), file=file)
    if len(out["prompt_tokens"]) > 1:  # mixed lengths: TTFT p50 per prompt length
        for m in out["models"]:
            for lv in m["levels"]:
                per = ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in lv["ttft_by_prompt_len"].items())
                name = Path(m["checkpoint"]).name
                print(f"{name} {_load(lv)}: TTFT p50 ms by prompt length {per}", file=file)
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
