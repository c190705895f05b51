"""Issue 22: the decode paths of one model in one process, interleaved: eager (a Python loop of
per-layer ops, the native attention / matmul kernels inside), compiled (torch.compile'd segments,
compiled_decode.py) and fused (each run of layers one native call, native_layers.py). Teacher-forced
tokens of Persuasion after `ctx` prompt tokens, batch 1; 3 rounds, the median reported.

    python benchmarks/decode_paths.py CHECKPOINT [--quantize int4|int8|none] [--kv-dtype bf16]
        [--threads 1] [--contexts 512,2048] [--paths eager,compiled,fused]
"""

import argparse
import statistics
import time

import torch

from subllm.bench.infer import load_text_tokens
from subllm.inference import hugepages, native
from subllm.inference.compiled_decode import compile_and_warm
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype
from subllm.inference.quantize import apply_quantization
from subllm.model.subllm import load_model

TEXT = "data/corpus/val/austen_persuasion.txt"
STEPS = 32


def ms_per_token(model, toks: torch.Tensor, ctx: int) -> float:
    with torch.no_grad():
        cache = new_cache(model, 1)
        prefill(model, toks[None, :ctx], None, cache)
        for t in toks[ctx : ctx + 4]:
            decode_step(model, cache, t[None])
        t0 = time.perf_counter()
        for t in toks[ctx + 4 : ctx + 4 + STEPS]:
            decode_step(model, cache, t[None])
    return (time.perf_counter() - t0) / STEPS * 1e3


def use(model, path: str, compiled) -> None:
    model.native_layers = path == "fused"
    model.compiled_decode = compiled if path == "compiled" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="int4")
    ap.add_argument("--kv-dtype", choices=("same", "bf16"), default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--paths", default="eager,compiled,fused")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"native kernels: {native.status()}; cpu capability {native.capability()}; threads {a.threads}")
    model = set_kv_dtype(apply_quantization(load_model(a.checkpoint).eval(), a.quantize), a.kv_dtype)
    hugepages.place(model)  # as generate and serve keep the weights
    paths = a.paths.split(",")
    compiled = None
    if "compiled" in paths:
        model.native_layers = False
        print(f"compiling: {compile_and_warm(model, 'fp32', (1,)):.0f} s")
        compiled = model.compiled_decode
    contexts = [int(c) for c in a.contexts.split(",")]
    toks = torch.tensor(load_text_tokens(TEXT, a.checkpoint, model.config.vocab_size)[: max(contexts) + 40])
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(3):
        for ctx in contexts:
            for p in paths:
                use(model, p, compiled)
                times.setdefault((ctx, p), []).append(ms_per_token(model, toks, ctx))
    for (ctx, p), v in sorted(times.items()):
        rounds = ", ".join(f"{x:.2f}" for x in v)
        med = statistics.median(v)
        print(f"{a.quantize} kv {a.kv_dtype} ctx {ctx} {p:9s} {med:6.2f} ms/token ({rounds})")


if __name__ == "__main__":
    main()
