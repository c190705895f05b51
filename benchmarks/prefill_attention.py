"""bf16 prefill attention: the native AVX512-BF16 kernel (csrc/prefill_attention.cpp) against torch's
SDPA, in process, interleaved, medians.

1. The attention alone at a checkpoint's head shapes (causal, one prompt), GFLOP/s of each.
2. Whole bf16-autocast prefills of each checkpoint (`model.native_prefill` True / False), one pass
   and in chunks of 512 as `subllm serve` runs them, with the largest |logit| difference between
   the two paths.

    python benchmarks/prefill_attention.py CHECKPOINT [CHECKPOINT ...] [--lengths 512,1024,2048] [--threads 1]
"""

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from subllm.dtype import autocast
from subllm.inference import hugepages, native
from subllm.inference.chunked_prefill import prefill_chunked
from subllm.inference.engine import new_cache, prefill
from subllm.model.subllm import load_model


def interleaved(fns: dict, rounds: int) -> dict:
    """name -> median seconds over `rounds` rounds, the order reversed every other round."""
    t = {name: [] for name in fns}
    for f in fns.values():
        f()  # warm-up
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            t[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in t.items()}


def kernel_alone(cfg, lengths: list[int], rounds: int) -> None:
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    for T in lengths:
        q = torch.randn(1, T, H, D, generator=g).bfloat16().transpose(1, 2)
        k, v = (torch.randn(1, Hkv, T, D, generator=g).bfloat16() for _ in range(2))
        sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=H != Hkv)
        t = interleaved({"native": partial(native.prefill_attention, q, k, v, 0), "sdpa": sdpa}, rounds)
        flops = 2 * T * T * D * H  # causal: half of Q K^T and P V
        print(
            f"  attention alone, {H}/{Hkv} heads of {D}, {T} tokens: native {t['native'] * 1e3:.2f} ms "
            f"({flops / t['native'] / 1e9:.0f} GFLOP/s), SDPA {t['sdpa'] * 1e3:.2f} ms "
            f"({flops / t['sdpa'] / 1e9:.0f} GFLOP/s), {t['sdpa'] / t['native']:.2f}x"
        )


def whole_prefills(model, lengths: list[int], rounds: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    for T in lengths:
        ids = torch.randint(5, model.config.vocab_size, (1, T), generator=g)

        def run(use: bool, chunked: bool, ids=ids):
            model.native_prefill = use
            cache = new_cache(model, 1)
            if chunked:
                return prefill_chunked(model, ids, None, cache, chunk)
            return prefill(model, ids, None, cache)

        kinds = [("one pass", False)] + ([(f"chunks of {chunk}", True)] if T > chunk else [])
        for label, chunked in kinds:
            with autocast("bf16", "cpu"):
                t = interleaved(
                    {"native": partial(run, True, chunked), "sdpa": partial(run, False, chunked)}, rounds
                )
                diff = (run(True, chunked).float() - run(False, chunked).float()).abs().max().item()
            print(
                f"  prefill {T} tokens, {label}: native {t['native']:.3f} s, SDPA {t['sdpa']:.3f} s, "
                f"{t['sdpa'] / t['native']:.2f}x faster; max |dlogit| {diff:.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per chunk (subllm serve's default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    if not native.bf16_available():
        raise SystemExit(f"the bf16 prefill kernel does not run here ({native.status()}; needs AVX512-BF16)")
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"cpu capability {native.capability()}; threads {a.threads}; bf16 autocast; {a.rounds} rounds")
    for ck in a.checkpoints:
        model = hugepages.place(load_model(ck).eval())
        print(f"{ck} (structure {model.config.structure}):")
        kernel_alone(model.config, lengths, a.rounds)
        whole_prefills(model, lengths, a.rounds, a.chunk)


if __name__ == "__main__":
    main()
