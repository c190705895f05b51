"""Ragged prefill attention on this CPU: one masked SDPA call for a batch of rows of different
lengths vs one causal SDPA call per row on its exact length (what subllm/inference/engine.py does).

    OMP_NUM_THREADS=1 python benchmarks/ragged_attention.py [--batch 8 --length 2600 --heads 4 --head-dim 64]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2600)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    B, H, L, D = a.batch, a.heads, a.length, a.head_dim
    lens = [L - int(x) for x in torch.randint(0, max(1, L // 10), (B,))]
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    valid = torch.arange(L) < torch.tensor(lens)[:, None]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = (causal & valid[:, None, None, :]) | torch.eye(L, dtype=torch.bool)

    def per_row():
        out = torch.zeros(B, H, L, D)
        for b, n in enumerate(lens):
            out[b, :, :n] = F.scaled_dot_product_attention(
                q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], is_causal=True
            )[0]
        return out

    def masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    times = {"per_row": [], "masked": []}
    for _ in range(a.reps):  # interleaved
        for name, fn in (("per_row", per_row), ("masked", masked)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    x, y = per_row(), masked()
    diff = max((x[i, :, :n] - y[i, :, :n]).abs().max().item() for i, n in enumerate(lens))
    best = {k: min(v) for k, v in times.items()}
    print(f"B {B} L {L} heads {H}x{D}: per-row causal {best['per_row']:.3f} s, "
          f"one masked call {best['masked']:.3f} s ({best['masked'] / best['per_row']:.2f}x), "
          f"max |diff| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
