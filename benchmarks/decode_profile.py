"""Where the time of one decode token goes: torch.profiler over a few decode steps of a checkpoint
(optionally quantized and compiled) after a prompt, the ops sorted by their own CPU time, and the
unprofiled ms per token. One thread by default. Not a benchmark of record (no interleaving).
Tokens are random ids unless `--text FILE` gives real text (a SUBLLM's keep, and so its decode
work, depends on the tokens: random ids are kept far less often than text). With `--group-by-stack`
the table lists the Python call sites too.

    python benchmarks/decode_profile.py CHECKPOINT [--quantize int4] [--compile] [--prompt 512] [--text F]
"""

import argparse
import time

import torch
from torch.profiler import profile

from subllm.inference.compiled_decode import compile_and_warm
from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.inference.quantize import QUANTIZE, apply_quantization
from subllm.model.subllm import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--quantize", choices=QUANTIZE, default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8, help="profiled decode steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", help="teacher-force the tokens of this text file instead of random ids")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = apply_quantization(load_model(a.checkpoint).eval(), a.quantize)
    if a.compile:
        compile_and_warm(m, "fp32", (1,))
    n = a.prompt + 40 + a.steps
    if a.text:
        from subllm.bench.infer import load_text_tokens

        toks = torch.tensor(load_text_tokens(a.text, a.checkpoint, m.config.vocab_size)[:n])
    else:
        toks = torch.randint(3, m.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = new_cache(m, 1)
        prefill(m, toks[None, : a.prompt], None, c)
        for t in toks[a.prompt : a.prompt + 8]:  # warm-up
            decode_step(m, c, t[None])
        t0 = time.perf_counter()
        for t in toks[a.prompt + 8 : a.prompt + 40]:
            decode_step(m, c, t[None])
        print(f"{(time.perf_counter() - t0) / 32 * 1e3:.2f} ms/token unprofiled (32 steps)")
        with profile() as p:
            for t in toks[a.prompt + 40 :]:
                decode_step(m, c, t[None])
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
