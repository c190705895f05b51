"""The native dense fp32 matmul of decode steps (csrc/dense_matmul.cpp) against ATen's `F.linear`, at
SmolLM2-135M's shapes: 30 layers' QKV / output / gate-up / down weights (540 MB, more than L3) and the
49,152 x 576 head, per decode step of M rows; interleaved rounds, medians. Also how far a row computed
among M rows is from the same row alone, for each (ATen: a lone row takes another kernel).

    python benchmarks/dense_matmul.py [--rows 1,4,16] [--threads 1] [--rounds 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from subllm.inference import native

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not native.load():
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    print(f"cpu capability {native.capability()}; threads {a.threads}; {len(SHAPES)} weights per step")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) for n, k in SHAPES]
    kernels = {"aten": F.linear, "native": native.dense_matmul}
    for M in (int(r) for r in a.rows.split(",")):
        xs = {k: torch.randn(M, k, generator=g) for k in (576, 1536)}
        t = {name: [] for name in kernels}
        for r in range(a.rounds):
            for name in list(kernels) if r % 2 == 0 else list(kernels)[::-1]:
                t0 = time.perf_counter()
                for w in ws:
                    kernels[name](xs[w.shape[1]], w)
                t[name].append(time.perf_counter() - t0)
        aten, nat = statistics.median(t["aten"]), statistics.median(t["native"])
        x, head = xs[576], ws[-1]
        drift = {
            name: max((f(x, head)[i] - f(x[i : i + 1], head)[0]).abs().max().item() for i in range(M))
            for name, f in kernels.items()
        }
        print(
            f"{M} rows: ATen {aten * 1e3:.1f} ms, native {nat * 1e3:.1f} ms per step ({aten / nat:.2f}x); "
            f"a row among {M} vs alone, max |dy| on the head: ATen {drift['aten']:.1e}, "
            f"native {drift['native']:.1e}"
        )


if __name__ == "__main__":
    main()
