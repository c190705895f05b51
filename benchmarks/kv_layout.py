"""Issue 21: the two KV-cache layouts of one model in one process, interleaved - rows in one buffer
per layer (KVCache) and rows stored apart (RowKVCache, subllm/inference/cache_rows.py). A ragged
batch: B windows of Persuasion at different offsets (the S modules keep different numbers of tokens
per row) and, with --ragged-prompts, prompt lengths from ctx down to ctx / 2 (left-padded). Prefill
with the decode tokens reserved, then 32 teacher-forced decode steps, timed; 3 rounds, medians.
Reports decode ms/step, K/V allocated (torch storages) against held, and against the bytes a LLaMA
of the same layers would hold for the same tokens (the ideal ratio is held / that).

    python benchmarks/kv_layout.py CHECKPOINT [--batch-sizes 4,8] [--ctx 1024] [--ragged-prompts]
        [--quantize int4] [--kv-dtype bf16] [--threads 1]
"""

import argparse
import statistics
import time

import torch

from subllm.bench.infer import load_text_tokens
from subllm.inference import hugepages, native
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype
from subllm.inference.quantize import apply_quantization
from subllm.model.subllm import load_model

TEXT = "data/corpus/val/austen_persuasion.txt"
STEPS = 32


def batch(toks: torch.Tensor, B: int, ctx: int, ragged: bool) -> tuple[torch.Tensor, ...]:
    """(ids (B, ctx) left-padded, mask, decode feed (STEPS, B)) from windows 3000 tokens apart."""
    ids = torch.zeros(B, ctx, dtype=torch.long)
    mask = torch.zeros(B, ctx, dtype=torch.long)
    feed = torch.zeros(STEPS, B, dtype=torch.long)
    for b in range(B):
        n = ctx - (b * ctx // (2 * B) if ragged else 0)
        w = toks[b * 3000 : b * 3000 + n + STEPS]
        ids[b, ctx - n :], mask[b, ctx - n :], feed[:, b] = w[:n], 1, w[n:]
    return ids, mask, feed


def run(model, ids, mask, feed, packed: bool) -> tuple[float, object]:
    with torch.no_grad():
        cache = new_cache(model, ids.shape[0], packed=packed)
        prefill(model, ids, mask, cache, extra=STEPS)
        t0 = time.perf_counter()
        for tok in feed:
            decode_step(model, cache, tok)
    return (time.perf_counter() - t0) / STEPS * 1e3, cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--ragged-prompts", action="store_true")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="int4")
    ap.add_argument("--kv-dtype", choices=("same", "bf16"), default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"native kernels: {native.status()}; cpu capability {native.capability()}; threads {a.threads}")
    model = set_kv_dtype(apply_quantization(load_model(a.checkpoint).eval(), a.quantize), a.kv_dtype)
    hugepages.place(model)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    toks = torch.tensor(load_text_tokens(TEXT, a.checkpoint, model.config.vocab_size))
    data = {B: batch(toks, B, a.ctx, a.ragged_prompts) for B in sizes}
    times: dict[tuple[int, bool], list[float]] = {}
    caches = {}
    for r in range(3):
        for B in sizes:
            for packed in (False, True) if r % 2 == 0 else (True, False):
                ms, caches[B, packed] = run(model, *data[B], packed)
                times.setdefault((B, packed), []).append(ms)
    n_layers = model.config.n_layers
    for (B, packed), v in sorted(times.items()):
        c = caches[B, packed]
        llama = c.bytes_per_token() * n_layers * sum(c.snapshot()[0])  # the same tokens, every layer
        keep = [round(sum(lv) / sum(c.snapshot()[0]), 3) for lv in c.snapshot()[1:]]
        name = "rows apart" if packed else "one buffer"
        print(
            f"B {B} ctx {a.ctx}{' ragged' if a.ragged_prompts else ''} {name:10s} "
            f"decode {statistics.median(v):6.2f} ms/step ({', '.join(f'{x:.2f}' for x in v)}); "
            f"K/V allocated {c.allocated_nbytes() / 2**20:7.1f} MiB, held {c.nbytes() / 2**20:7.1f}; "
            f"vs LLaMA-held: allocated {c.allocated_nbytes() / llama:.4f}, ideal {c.nbytes() / llama:.4f}; "
            f"keep per level {keep}"
        )


if __name__ == "__main__":
    main()
