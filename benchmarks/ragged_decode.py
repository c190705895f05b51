"""Ragged decode attention on this CPU: a subset of a batch's rows (those whose S kept the new token)
attends, one query each, to its own cache of its own length. Three ways:

- per_row: one SDPA call per row on a view of exactly its length (what subllm/inference/engine.py does);
- masked_full: the queries scattered into the whole batch, one masked SDPA call over every row's
  cache (rows outside the subset computed and thrown away), then the subset's rows gathered;
- gathered: the subset's cache rows copied out (index_select), one masked SDPA call.

    OMP_NUM_THREADS=1 python benchmarks/ragged_decode.py [--batch 8 --length 4096 --keep 6]
        [--heads 4 --head-dim 64]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=4096, help="cache capacity; rows hold 90-100%% of it")
    p.add_argument("--keep", type=int, default=6, help="rows in the subset")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--calls", type=int, default=200, help="attention calls per timing (one per layer-step)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    B, H, L, D, n = a.batch, a.heads, a.length, a.head_dim, a.keep
    lens = [L - int(x) for x in torch.randint(0, max(1, L // 10), (B,))]
    rows = sorted(torch.randperm(B)[:n].tolist())
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)  # cache buffers (slots past a length unused)
    q = torch.randn(n, H, 1, D)
    ridx = torch.tensor(rows)
    full_mask = (torch.arange(L) < torch.tensor(lens)[:, None])[:, None, None, :]  # (B, 1, 1, L)
    sub_mask = full_mask[ridx]
    Lmax = max(lens[r] for r in rows)

    def per_row():
        return torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[i : i + 1], k[r : r + 1, :, : lens[r]], v[r : r + 1, :, : lens[r]]
                )
                for i, r in enumerate(rows)
            ]
        )

    def masked_full():
        qf = q.new_zeros(B, H, 1, D).index_copy(0, ridx, q)
        Lf = max(lens)
        o = F.scaled_dot_product_attention(qf, k[:, :, :Lf], v[:, :, :Lf], attn_mask=full_mask[..., :Lf])
        return o.index_select(0, ridx)

    def gathered():
        kk, vv = k[ridx, :, :Lmax], v[ridx, :, :Lmax]
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=sub_mask[..., :Lmax])

    fns = {"per_row": per_row, "masked_full": masked_full, "gathered": gathered}
    times = {name: [] for name in fns}
    for r in range(a.reps):  # interleaved, order alternating
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t = time.perf_counter()
            for _ in range(a.calls):
                fns[name]()
            times[name].append((time.perf_counter() - t) / a.calls)
    ref = per_row()
    diffs = {name: (fn() - ref).abs().max().item() for name, fn in fns.items()}
    best = {name: min(t) for name, t in times.items()}
    print(
        f"B {B} subset {n} rows, cache {L} (rows hold {min(lens)}-{max(lens)}), heads {H}x{D}, "
        f"{torch.get_num_threads()} thread(s); ms per call (min of {a.reps}):"
    )
    for name in fns:
        print(f"  {name:12s} {1e3 * best[name]:.3f} ms  ({best[name] / best['per_row']:.2f}x per_row)  "
              f"max |diff| {diffs[name]:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
