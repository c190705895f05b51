"""Decode-step time of a running batch as `subllm serve` forms it: B requests of a 1k-token prompt,
each prefilled alone and merged with KVCache.add_rows, then decode_step on all rows; bf16 autocast
vs fp32. What serving throughput can gain from batching on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/batched_decode.py \\
        --checkpoints runs/ablate/paper_s0,runs/ablate/llama_s0
"""

import argparse
import contextlib
import time

import torch

from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.model.subllm import SubLLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", required=True, help="comma-separated checkpoint folders")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--steps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    for ck in a.checkpoints.split(","):
        model = SubLLM.from_pretrained(ck).eval()
        V = model.config.vocab_size
        for dt in ("bf16", "fp32"):
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16" else contextlib.nullcontext()
            with amp, torch.no_grad():
                for B in [int(x) for x in a.batches.split(",")]:
                    g = torch.Generator().manual_seed(0)
                    batch = None
                    for _ in range(B):
                        c = new_cache(model, 1)
                        prefill(model, torch.randint(3, V, (1, a.prompt), generator=g), None, c)
                        batch = c if batch is None else (batch.add_rows(c), batch)[1]
                    tok = torch.randint(3, V, (B,), generator=g)
                    decode_step(model, batch, tok)  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(a.steps):
                        decode_step(model, batch, tok)
                    dt_s = (time.perf_counter() - t0) / a.steps
                    ms, rate = dt_s * 1e3, B / dt_s
                    print(f"{ck} {dt} batch {B}: {ms:.1f} ms/step, {rate:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
