"""Issue 22 item 5: llama.cpp as the peer. Our LLaMA and a SUBLLM against llama.cpp (llama-cpp-python
0.3.36, CPU) running the same weights, prefill and decode at batch 1, side by side in one run.

Run through benchmarks/llamacpp_peer.sh, which builds llama.cpp's virtualenv and writes the GGUFs
of our LLaMA (benchmarks/llamacpp_gguf.py) before calling this script:
    bash benchmarks/llamacpp_peer.sh --subllm runs/grid/sub080

Contestants: llama.cpp on our weights at F32, BF16 and Q8_0 plus the package's own Q4_1 file, and ours
(subllm/inference/engine.py prefill + decode_step, as `subllm bench infer` times them) for the LLaMA
and the SUBLLM at fp32, bf16 (autocast over fp32 weights), int8 weights (`--quantize int8`,
subllm/inference/quantize.py) with fp32 or bf16 activations, int4 weights (`--quantize int4`), and
fp32 / int8 / int4 with the compiled decode step (`--compile`, the "-c" variants; compiled before
timing; the native runs of layers turned off for them). The variants without "-c" decode in fp32
through the native runs of layers (subllm/inference/native_layers.py) wherever it runs. Without
--subllm the SUBLLM is a fresh conversion of the LLaMA (NESTED, keep 0.8, untrained identity-start
routers) whose thresholds are set on each context's own tokens (`subllm recalibrate`'s `recalibrate`)
so that it keeps about 0.8 per S: its speed, not its quality (the keep column gives the realised fractions).

Interleaving: llama.cpp runs in its own venv as a subprocess (benchmarks/llamacpp_worker.py) that
blocks on stdin between requests; our models run in this process, so only one contestant computes at
a time. For each (context, threads): one untimed warm-up round, then --reps rounds, each contestant
once per round (prefill, then teacher-forced decode from that prefill), the order reversed every
other round. Every contestant sees the same tokens: a window of --text under the LLaMA's tokenizer
(the prompt) and the next --decode-tokens of the text (fed one at a time, the logits of each
computed). Threads: torch.set_num_threads here, llama_set_n_threads (decode and batch) there.
Times are medians; llama.cpp's are taken inside the worker (the pipe round trip is not counted).

Before timing, a correctness check: each GGUF's logits over a prompt against our LLaMA in fp32
(max |dlogit|, top-1 agreement) and the greedy continuation of "The capital of France is".
A markdown table and one JSON line, printed and written to --out (table.md, result.jsonl).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from subllm.bench.common import environment, int_list, interleaved, json_line, median
from subllm.bench.infer import load_text_tokens, text_windows
from subllm.data.tokenizer import load_tokenizer
from subllm.dtype import autocast
from subllm.evals.selection import recalibrate
from subllm.flops import keep_fractions
from subllm.hf.llama import to_hf_llama
from subllm.inference import hugepages
from subllm.inference.compiled_decode import compile_and_warm, compile_decode
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype
from subllm.inference.generation import generate
from subllm.inference.quantize import apply_quantization
from subllm.model.subllm import SubLLM, load_model

NESTED = "TTTTTT(TTTTTT(TTTTTT)TTTTTT)TTTTTT"  # the paper's 5:5:2 shape on 30 layers (real_model_grid.sh)
# variant: (quantization, dtype, compiled decode, K/V dtype); "-c": subllm/inference/compiled_decode.py,
# "-kv16": a bf16 K/V cache (engine.py set_kv_dtype; llama.cpp's cache is F16 by default)
OURS = {
    "fp32": ("none", "fp32", False, "same"),
    "bf16": ("none", "bf16", False, "same"),
    "int8-fp32": ("int8", "fp32", False, "same"),
    "int8-bf16": ("int8", "bf16", False, "same"),
    "int4": ("int4", "fp32", False, "same"),
    "fp32-c": ("none", "fp32", True, "same"),
    "int8-c": ("int8", "fp32", True, "same"),
    "int4-c": ("int4", "fp32", True, "same"),
    "int8-c-kv16": ("int8", "fp32", True, "bf16"),
    "int4-c-kv16": ("int4", "fp32", True, "bf16"),
    "int8-kv16": ("int8", "fp32", False, "bf16"),
    "int4-kv16": ("int4", "fp32", False, "bf16"),
    # int4 with rank-R corrections on the grid of --llama (int4_correction.py; R: --int4-rank)
    "int4r-kv16": ("int4r", "fp32", False, "bf16"),
}
PEER = {
    "fp32": "F32",
    "bf16": "BF16",
    "int8-fp32": "Q8_0",
    "int8-bf16": "Q8_0",
    "int4": "Q4_1",
    "fp32-c": "F32",
    "int8-c": "Q8_0",
    "int4-c": "Q4_1",
    "int8-c-kv16": "Q8_0",
    "int4-c-kv16": "Q4_1",
    "int8-kv16": "Q8_0",
    "int4-kv16": "Q4_1",
    "int4r-kv16": "Q4_1",
}  # fmt: skip  (the file ours is set against)


class Worker:
    """llamacpp_worker.py in llama.cpp's venv: one JSON request, one JSON reply."""

    def __init__(self, python: str):
        script = Path(__file__).with_name("llamacpp_worker.py")
        self.p = subprocess.Popen(
            [python, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __call__(self, op: str, **kw) -> dict:
        self.p.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"llama.cpp worker exited (rc {self.p.wait()}) on {op}")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"llama.cpp worker, {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.p.stdin.write('{"op": "quit"}\n')
        self.p.stdin.close()
        self.p.wait()


# ---- correctness -----------------------------------------------------------------------------------
def compare(ours: torch.Tensor, theirs: np.ndarray) -> dict:
    """(T, V) logits -> max |dlogit| and top-1 agreement over the T positions."""
    theirs = torch.from_numpy(theirs).float()
    return dict(
        max_abs_dlogit=round(float((ours - theirs).abs().max()), 5),
        top1_agree=round(float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()), 4),
    )


def check(worker, ggufs: dict, llama: SubLLM, tok, passage: list[int], threads: int) -> dict:
    """Each GGUF against our LLaMA in fp32 on `passage`; the F32 file also with an F32 KV cache
    (F32_kv_f32), which isolates the weights from llama.cpp's default F16 K/V."""
    france = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = llama(torch.tensor([passage])).logits[0].float()
        greedy = generate(llama, torch.tensor([france]), max_new_tokens=8, temperature=0.0)[0, len(france) :]
    out = {"prompt_tokens": len(passage), "ours_greedy": tok.decode(greedy)}
    runs = [(k, p, False) for k, p in ggufs.items()] + [
        ("F32_kv_f32", p, True) for k, p in ggufs.items() if k == "F32"
    ]
    with tempfile.TemporaryDirectory() as d:
        for kind, path, kv_f32 in runs:
            common = dict(path=str(path), threads=threads, kv_f32=kv_f32, out=f"{d}/{kind}.npy")
            worker("check", ids=passage, n_ctx=len(passage) + 8, greedy=0, **common)
            logits = np.load(f"{d}/{kind}.npy")
            g = worker("check", ids=france, n_ctx=64, greedy=8, **common)["greedy"]
            out[kind] = compare(ref, logits) | dict(greedy=tok.decode(g), greedy_same=g == greedy.tolist())
    return out


# ---- our contestants ---------------------------------------------------------------------------------
def our_models(llama: SubLLM, subllm_dir: str | None, variants: list[str], specs: dict | None = None) -> dict:
    """{("LLaMA" | "SUBLLM", variant): (model, dtype)}; int8 variants share one quantized copy.
    `specs`: the quantization spec of a variant's first field where it is not the spec itself
    ({"int4r": "int4:rank=64:base=..."})."""
    specs = specs or {}
    plain = {"LLaMA": llama}
    if subllm_dir:
        plain["SUBLLM"] = load_model(subllm_dir)
    else:  # a fresh conversion with identity S/B modules (scores calibrated per context later)
        plain["SUBLLM"] = SubLLM.from_hf_llama(to_hf_llama(plain["LLaMA"]), NESTED, 0.8).eval()
    models, quantized = {}, {}
    for name, m in plain.items():
        for v in variants:
            q, dtype, compiled, kv = OURS[v]
            if q != "none" and (name, q) not in quantized:
                spec = specs.get(q, q)
                quantized[(name, q)] = hugepages.place(apply_quantization(copy.deepcopy(m).eval(), spec))
            model = quantized[(name, q)] if q != "none" else m
            if compiled or kv != "same":  # a shallow copy shares the weights; it alone carries its
                model = set_kv_dtype(copy.copy(model), kv)  # K/V dtype and compiled graphs
            if compiled:  # the compiled graphs, not the native runs of layers (which would take over)
                model = compile_decode(model)
                model.native_layers = False
            models[(name, v)] = (model, dtype)
    for m in plain.values():  # the fp32 variants' weights (in place: the shallow copies follow)
        hugepages.place(m)
    return models


def warm_compiled(models: dict) -> None:
    """Compile every compiled variant's graphs before timing (stderr: how long each took)."""
    for (name, v), (model, dtype) in models.items():
        if getattr(model, "compiled_decode", None) is not None:
            dt = compile_and_warm(model, dtype, (1,))
            print(f"compiled {name} {v} in {dt:.0f} s", file=sys.stderr, flush=True)


def ours_fn(model: SubLLM, dtype: str, ids: torch.Tensor, dec: torch.Tensor, state: dict):
    """One round of ours: prefill (timed), then decode from that prefill (timed); keep fractions."""

    def run() -> dict:
        with torch.no_grad(), autocast(dtype):
            t = time.perf_counter()
            cache = new_cache(model, 1)
            prefill(model, ids, None, cache, extra=dec.shape[0] + 1)  # +1: compiled decode's room
            t_pre = time.perf_counter() - t
            start = cache.snapshot()
            t = time.perf_counter()
            for tk in dec:
                decode_step(model, cache, tk)
            t_dec = time.perf_counter() - t
        zero = [[0] for _ in start]
        c = model.config
        state["keep"] = [keep_fractions(c, zero, start), keep_fractions(c, start, cache.snapshot())]
        return dict(prefill=t_pre, decode=t_dec)

    return run


def peer_fn(worker, name: str, threads: int, ids: list[int], dec: list[int]):
    def run() -> dict:
        pre = worker("prefill", name=name, threads=threads, ids=ids)["s"]
        return dict(
            prefill=pre, decode=worker("decode", name=name, threads=threads, start=len(ids), ids=dec)["s"]
        )

    return run


def rounds(fns: dict, reps: int, warmup: int) -> dict:
    """`interleaved` (subllm/bench/common.py: warm-up rounds, then the order reversed every other
    round) over calls that time their own prefill and decode; the warm-up rounds' times dropped."""
    times = {n: {"prefill": [], "decode": []} for n in fns}

    def recording(n):
        def call():
            for k, v in fns[n]().items():
                times[n][k].append(v)

        return call

    interleaved({n: recording(n) for n in fns}, reps, warmup)
    return {n: {k: v[warmup:] for k, v in t.items()} for n, t in times.items()}


# ---- the run ---------------------------------------------------------------------------------------
def summarise(ctx: int, threads: int, times: dict, n_dec: int, keeps: dict) -> list[dict]:
    """Median tokens/s per contestant; ours also / llama.cpp's on the file of its precision (PEER)."""
    tps = {
        n: dict(prefill=ctx / median(t["prefill"]), decode=n_dec / median(t["decode"]))
        for n, t in times.items()
    }
    out = []
    for (eng, v), r in tps.items():
        peer = None if eng == "llama.cpp" else PEER[v]
        ratio = (
            {s: round(r[s] / tps[("llama.cpp", peer)][s], 4) for s in r}
            if ("llama.cpp", peer) in tps
            else None
        )
        keep = keeps.get((eng, v), {}).get("keep") if eng == "SUBLLM" else None
        out.append(dict(
            ctx=ctx, threads=threads, engine="llama.cpp" if eng == "llama.cpp" else "subllm",
            model="LLaMA" if eng == "llama.cpp" else eng, precision=v, peer=peer,
            prefill_tok_s=round(r["prefill"], 2), decode_tok_s=round(r["decode"], 2), ratio=ratio,
            keep_prefill_decode=None if keep is None else [[round(f, 3) for f in k] for k in keep],
            prefill_s=[round(x, 4) for x in times[(eng, v)]["prefill"]],
            decode_s=[round(x, 4) for x in times[(eng, v)]["decode"]],
        ))  # fmt: skip
    return out


HEAD = ["ctx", "threads", "engine", "model", "precision", "keep pre / dec", "prefill tok/s", "decode tok/s",
        "peer", "prefill x", "decode x"]  # fmt: skip


def markdown(results: list[dict], head: bool = True) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)] if head else []
    for r in results:
        keep = r["keep_prefill_decode"]
        keep = "-" if keep is None else " / ".join(",".join(f"{f:.2f}" for f in k) for k in keep)
        x = r["ratio"] or {"prefill": "-", "decode": "-"}
        speed = [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}"]
        cells = [r["ctx"], r["threads"], r["engine"], r["model"], r["precision"], keep, *speed,
                 r["peer"] or "-", x["prefill"], x["decode"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--llamacpp-python", required=True, help="python of the venv with llama-cpp-python")
    p.add_argument("--llama", default="runs/real/llama", help="our all-T LLaMA (SubLLM folder)")
    p.add_argument("--subllm", help="a SUBLLM checkpoint (default: a fresh conversion of --llama)")
    p.add_argument(
        "--gguf-dir", required=True, help="NAME.{F32,BF16,Q8_0}.gguf of --llama (llamacpp_gguf.py)"
    )
    p.add_argument("--reference", default="data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", default="data/corpus/val/austen_persuasion.txt")
    p.add_argument("--contexts", type=int_list, default=[512, 2048])
    p.add_argument("--threads", type=int_list, default=[1, 2])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ours", default=",".join(OURS), help=f"our variants, of {','.join(OURS)}")
    p.add_argument("--int4-rank", type=int, default=64, help="the rank of the int4r variants' corrections")
    p.add_argument("--peers", default="F32,BF16,Q8_0,Q4_1", help="llama.cpp files (Q4_1: --reference)")
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp's n_batch (its default)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (default off)")
    p.add_argument("--check-tokens", type=int, default=128, help="prompt tokens of the logit check")
    p.add_argument("--out", default="runs/llamacpp_peer")
    a = p.parse_args()
    torch.manual_seed(0)
    variants = a.ours.split(",") if a.ours else []
    name = Path(a.llama).name
    ggufs = {
        k: Path(a.reference if k == "Q4_1" else f"{a.gguf_dir}/{name}.{k}.gguf") for k in a.peers.split(",")
    }
    worker = Worker(a.llamacpp_python)
    info = worker("info")
    tok, llama = load_tokenizer(a.llama), load_model(a.llama)
    models = our_models(llama, a.subllm, variants, {"int4r": f"int4:rank={a.int4_rank}:base={a.llama}"})
    kernels = {f"{n} {v}": getattr(m, "int8_kernel", None) for (n, v), (m, _) in models.items()}
    print(f"int8 decode kernels (chosen by measurement): {kernels}", file=sys.stderr, flush=True)
    warm_compiled(models)
    tokens = load_text_tokens(a.text, a.llama, llama.config.vocab_size)
    checked = check(worker, ggufs, llama, tok, tokens[: a.check_tokens], max(a.threads))
    print(f"check vs our LLaMA fp32 ({a.check_tokens} tokens of {a.text}): {checked}", file=sys.stderr)

    results = []
    for ctx in a.contexts:
        ids, dec = text_windows(tokens, ctx, 1, a.decode_tokens)
        for k, path in ggufs.items():
            n_ctx = ctx + a.decode_tokens
            worker(
                "open",
                name=f"{k}@{ctx}",
                path=str(path),
                n_ctx=n_ctx,
                n_batch=a.n_batch,
                flash_attn=a.flash_attn,
            )
        if not a.subllm:  # the fresh SUBLLM: thresholds for keep 0.8 on this context's tokens
            for model in {id(m): m for (e, _), (m, _) in models.items() if e == "SUBLLM"}.values():
                recalibrate(model, [torch.cat([ids, dec.T], 1)])
        for threads in a.threads:
            torch.set_num_threads(threads)
            prompt, fed = ids[0].tolist(), dec[:, 0].tolist()
            fns = {("llama.cpp", k): peer_fn(worker, f"{k}@{ctx}", threads, prompt, fed) for k in ggufs}
            keeps = {n: {} for n in models}
            fns |= {n: ours_fn(model, dtype, ids, dec, keeps[n]) for n, (model, dtype) in models.items()}
            results += summarise(ctx, threads, rounds(fns, a.reps, a.warmup), a.decode_tokens, keeps)
            print(markdown(results[-len(fns) :], head=False), file=sys.stderr, flush=True)
        for k in ggufs:
            worker("close", name=f"{k}@{ctx}")
    worker.close()
    env = environment() | dict(llama_cpp=info["version"], llama_cpp_system=info["system_info"])
    report = dict(
        bench="llamacpp_peer", llama=a.llama, subllm=a.subllm or f"fresh {NESTED} keep 0.8, recalibrated",
        text=a.text, decode_tokens=a.decode_tokens, reps=a.reps, warmup=a.warmup, n_batch=a.n_batch,
        flash_attn=a.flash_attn, llamacpp_kv_cache="f16 (default)", int8_kernels=kernels, check=checked,
        results=results, env=env,
    )  # fmt: skip
    head = (
        f"llama.cpp {info['version']} (llama-cpp-python) vs subllm, batch 1, {a.decode_tokens} teacher-forced"
        f" decode tokens, median of {a.reps}; x = ours / llama.cpp tokens/s on the peer file (> 1: ours"
        f" faster); {env['date_utc']}, {env['cpu']}"
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{head}\n\n{markdown(results)}\n")
    with open(out / "result.jsonl", "a") as f:
        f.write(json_line(report) + "\n")
    print(f"{head}\n\n{markdown(results)}")
    print(json_line(report))


if __name__ == "__main__":
    main()
