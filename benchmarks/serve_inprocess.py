"""Issue 21: where a served batch's time goes - the batcher of `subllm serve` driven in process (no
HTTP, no client process): a closed loop of `--concurrency` requests over windows of Persuasion,
greedy, as `subllm bench serve` sends them. Reports generated tokens/s and the wall time split into
decode steps, prompt work (prefill) and the rest (sampling, detokenizing, bookkeeping); then
torch.profiler's top ops of one prefill of the prompt length.

    python benchmarks/serve_inprocess.py CHECKPOINT [--prompt-tokens 1024] [--max-tokens 128]
        [--concurrency 16] [--requests 32] [--prefill-dtype bf16] [--threads 1]
"""

import argparse
import gc
import time

import torch

import subllm.serve.batcher as batcher_mod
from subllm.bench.serve import prompt_windows
from subllm.data.tokenizer import load_tokenizer
from subllm.dtype import autocast
from subllm.inference import hugepages, native
from subllm.inference.engine import new_cache, prefill
from subllm.model.subllm import load_model
from subllm.serve.prefill import PrefillQueue
from subllm.serve.request import Request, Settings

TEXT = "data/corpus/val/austen_persuasion.txt"


def timed(spent: dict, key: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key] += time.perf_counter() - t0

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefill-dtype", choices=("same", "bf16"), default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)  # as the batcher's worker thread runs
    print(f"native kernels: {native.status()}; cpu capability {native.capability()}; threads {a.threads}")
    model = hugepages.place(load_model(a.checkpoint).eval())
    tok = load_tokenizer(a.checkpoint)
    gc.freeze()  # as `subllm serve` does once the model and tokenizer are loaded (cli/serve.py)
    pre = None if a.prefill_dtype == "same" else a.prefill_dtype
    ps = prompt_windows(TEXT, a.checkpoint, [a.prompt_tokens], a.requests, model.config.vocab_size)
    spent = {"decode": 0.0, "prefill": 0.0}
    batcher_mod.decode_step = timed(spent, "decode", batcher_mod.decode_step)
    PrefillQueue.round = timed(spent, "prefill", PrefillQueue.round)
    b = batcher_mod.Batcher(
        model, tok, None, max_batch=a.concurrency, max_queue=4 * a.requests, prefill_dtype=pre
    )
    finished = []
    settings = Settings(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(p, settings, lambda kind, x: kind == "done" and finished.append(x)) for p in ps]
    b.submit(reqs[: a.concurrency])
    sent, steps = a.concurrency, 0
    t0 = time.perf_counter()
    while b.running or b.prefilling or b.waiting or sent < len(reqs):
        before = len(finished)
        b.step(b._pop_admissible())
        steps += 1
        for _ in range(len(finished) - before):  # closed loop: a finished request is replaced
            if sent < len(reqs):
                b.submit(reqs[sent])
                sent += 1
    wall = time.perf_counter() - t0
    rest = wall - spent["decode"] - spent["prefill"]
    rate = len(reqs) * a.max_tokens / wall
    print(
        f"{len(reqs)} requests x {a.max_tokens} tokens, {a.prompt_tokens}-token prompts, "
        f"{a.concurrency} at a time: {wall:.1f} s, {rate:.1f} gen tok/s, {steps} steps; "
        f"decode {spent['decode']:.1f} s, prefill {spent['prefill']:.1f} s, rest {rest:.1f} s"
    )
    ids = torch.tensor(ps[:1])
    with autocast(a.prefill_dtype if pre else "fp32", "cpu"):
        prefill(model, ids, None, new_cache(model, 1))
        with torch.profiler.profile() as prof:
            prefill(model, ids, None, new_cache(model, 1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


if __name__ == "__main__":
    main()
