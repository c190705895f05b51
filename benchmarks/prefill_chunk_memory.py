"""Peak memory of one prefill with and without chunking (subllm/inference/chunked_prefill.py): each setting
runs in a fresh process and reports its resident-set high-water mark (VmHWM), the KV cache bytes
and the per-level lengths (which must be the same for every chunk size).

    OMP_NUM_THREADS=1 python benchmarks/prefill_chunk_memory.py --preset subllm-small --length 8192 \\
        --chunks none,1024,256

Untrained weights (seed 0), fp32, batch 1, one thread. Prints one line per setting.
"""

import argparse
import subprocess
import sys
import time


def one(preset: str, length: int, chunk: int | None) -> str:
    import torch

    from subllm.config import get_preset
    from subllm.inference.engine import new_cache, prefill
    from subllm.model.subllm import SubLLM
    from subllm.trainer.loop import peak_rss_mb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg = cfg.replace(max_seq_len=max(length, cfg.max_seq_len))
    model = SubLLM(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, length))
    before = peak_rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = new_cache(model, 1)
        logits = prefill(model, ids, None, cache, chunk=chunk)
    dt = time.perf_counter() - t0
    return (
        f"{preset} T={length} chunk={chunk}: peak RSS {peak_rss_mb():.0f} MiB (model built: {before:.0f}), "
        f"KV held {cache.nbytes() / 2**20:.1f} MiB, {dt:.1f} s, lengths {cache.snapshot()}, "
        f"logits[0, :2] {[round(v, 6) for v in logits[0, :2].tolist()]}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="subllm-small")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--chunks", default="none,1024,256")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(one(a.preset, a.length, None if a.one == "none" else int(a.one)))
        return
    for c in a.chunks.split(","):
        cmd = [sys.executable, __file__, "--preset", a.preset, "--length", str(a.length), "--one", c]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
