"""Issue 22: the native VNNI kernels' activation passes (native.ACT_PASSES: 1 or 2) in a whole
compiled decode step, one process, the two settings interleaved (each compiled first; 3 rounds of 32
teacher-forced tokens after `ctx` tokens of Persuasion, batch 1; the median round reported).

    python benchmarks/native_passes.py CHECKPOINT --quantize int4 [--threads 1] [--contexts 512,2048]
"""

import argparse
import statistics

import torch
from decode_paths import ms_per_token  # benchmarks/ (the script's folder) is on sys.path

from subllm.bench.infer import load_text_tokens
from subllm.inference import native
from subllm.inference.compiled_decode import compile_and_warm
from subllm.inference.quantize import quantize_
from subllm.model.subllm import load_model

TEXT = "data/corpus/val/austen_persuasion.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--quantize", choices=("int4", "int8"), default="int4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="512,2048")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not native.vnni_available():
        raise SystemExit(f"the native kernels do not run here: {native.status()}")
    model = quantize_(load_model(a.checkpoint).eval(), a.quantize, int8_kernel="native")
    for p in (1, 2):  # a graph per setting (the constant is read when the graphs are traced)
        native.ACT_PASSES = p
        compile_and_warm(model, "fp32", (1,))
    contexts = [int(c) for c in a.contexts.split(",")]
    toks = torch.tensor(load_text_tokens(TEXT, a.checkpoint, model.config.vocab_size)[: max(contexts) + 40])
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(3):
        for ctx in contexts:
            for p in (1, 2):
                native.ACT_PASSES = p
                times.setdefault((ctx, p), []).append(ms_per_token(model, toks, ctx))
    for (ctx, p), v in sorted(times.items()):
        runs = [round(x, 2) for x in v]
        print(f"{a.quantize} ctx {ctx} passes {p}: {statistics.median(v):.2f} ms/token ({runs})")


if __name__ == "__main__":
    main()
