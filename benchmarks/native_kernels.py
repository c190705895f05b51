"""Issue 22: the native decode kernels (subllm/inference/native.py) against torch's, one decode
step's worth of SmolLM2-135M shapes, interleaved rounds, medians. Not a benchmark of record for
whole decode steps (benchmarks/llamacpp_peer.py and `subllm bench infer` time those).

- attention: one query, 9 heads over 3 K/V heads of 64, at each context; 30 distinct layers' caches
  (so no layer's K/V stays in L2, as in a decode step): SDPA over fp32 K/V against the native kernel
  over fp32 and bf16 K/V; microseconds per layer. With `--cold-mb N`, also the native kernel over
  bf16 K/V on huge pages with N MB read before each layer (as a decode step reads a layer's weights
  between two attentions, so the K/V come from DRAM), only the kernel timed; best of the rounds.
- linear layers: the 120 layers of the 30 blocks (wqkv 960 x 576, wo 576 x 576, w13 3072 x 576,
  w2 576 x 1536) at one and four rows: torch's int4 kernel, the native int4 and int8 kernels
  (native.ACT_PASSES activation passes); and the 49,152 x 576 int8 LM head through fbgemm's dynamic
  kernel and the native one; milliseconds per token.

    python benchmarks/native_kernels.py [--threads 1] [--contexts 512,2048] [--rounds 7] [--cold-mb 10]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from subllm.inference import int8_dynamic, native
from subllm.inference.quantize import Int4Linear, Int8Linear, decode_kernels, int4_codes

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) of one SmolLM2 block


def rounds(fns: dict, n: int, per: float) -> dict:
    """{name: median of n interleaved timings / per}."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - t) / per)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def attention(L: int, n: int) -> None:
    q = torch.randn(1, 9, 1, 64)
    ks = [torch.randn(1, 3, L + 256, 64) for _ in range(LAYERS)]
    vs = [torch.randn(1, 3, L + 256, 64) for _ in range(LAYERS)]
    kb, vb = [k.bfloat16() for k in ks], [v.bfloat16() for v in vs]
    rows, lens = torch.tensor([0]), torch.tensor([L])
    fns = {
        "SDPA fp32": lambda: [
            F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], enable_gqa=True)
            for k, v in zip(ks, vs)
        ],
        "native fp32": lambda: [native.decode_attention(q, k, v, rows, lens) for k, v in zip(ks, vs)],
        "native bf16": lambda: [native.decode_attention(q, k, v, rows, lens) for k, v in zip(kb, vb)],
    }
    print(f"attention at {L} keys, us per layer: {rounds(fns, n, LAYERS / 1e6)}", flush=True)


def attention_cold(L: int, n: int, mb: int) -> None:
    from subllm.inference import hugepages

    kv = hugepages.zeros((2, LAYERS, 1, 3, L, 64), torch.bfloat16)
    kv.normal_()
    other = hugepages.zeros((LAYERS, (mb << 20) // 4), torch.float32)
    q, rows, lens = torch.randn(1, 9, 1, 64), torch.tensor([0]), torch.tensor([L])
    best = float("inf")
    for _ in range(n):
        total = 0.0
        for i in range(LAYERS):
            other[i].sum()  # another layer's worth of bytes through the caches
            t = time.perf_counter()
            native.decode_attention(q, kv[0, i], kv[1, i], rows, lens)
            total += time.perf_counter() - t
        best = min(best, total)
    gbs = kv.numel() * kv.element_size() / best / 1e9
    print(
        f"attention at {L} keys, bf16 K/V from DRAM ({mb} MB read before each layer): "
        f"{best / LAYERS * 1e6:.1f} us per layer, {gbs:.1f} GB/s",
        flush=True,
    )


def linears(n: int, rows: tuple[int, ...] = (1, 4)) -> None:
    layers = []
    for _ in range(LAYERS):
        for N, K in SHAPES:
            w = torch.randn(N, K) * 0.02
            i4 = Int4Linear(*int4_codes(w), kernel="torch")
            i8 = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=False))
            layers.append((i4, native.int4_pack(*int4_codes(w)), native.int8_pack(i8.q, i8.scale), K))
    head = Int8Linear.from_linear(torch.nn.Linear(576, 49152, bias=False))
    head_native = native.int8_pack(head.q, head.scale)
    if int8_dynamic.available():
        head.kernel = "dynamic"
    for M in rows:
        _linears_at(M, layers, head, head_native, n)


def _linears_at(M: int, layers: list, head: Int8Linear, head_native: tuple, n: int) -> None:
    p = native.ACT_PASSES
    xs = {K: torch.randn(M, K) for K in (576, 1536)}
    fns = {
        "int4 torch": lambda: [lin(xs[K]) for lin, _, _, K in layers],
        "int4 native": lambda: [native.int4_matmul(xs[K], *t, passes=p) for _, t, _, K in layers],
        "int8 native": lambda: [native.int8_matmul(xs[K], *t, passes=p) for _, _, t, K in layers],
        f"head {head.kernel}": lambda: head(xs[576]),
        "head native": lambda: native.int8_matmul(xs[576], *head_native, passes=p),
    }
    with torch.no_grad(), decode_kernels():
        print(f"linear layers at {M} row(s), ms per token: {rounds(fns, n, 1e-3)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cold-mb", type=int, default=0, help="also attention from DRAM (MB read per layer)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not native.vnni_available():
        raise SystemExit(f"the native kernels do not run here: {native.status()}")
    print(f"threads {a.threads}, cpu capability {native.capability()}, kernels {native.status()}")
    with torch.no_grad():
        for L in a.contexts.split(","):
            attention(int(L), a.rounds)
            if a.cold_mb:
                attention_cold(int(L), a.rounds, a.cold_mb)
        linears(a.rounds)


if __name__ == "__main__":
    main()
