"""How int4 weights meet an uptrained model (issue 22's int4 quality target on a real uptrained SUBLLM).

Uptraining moves each layer weight of a converted model a little; int4 rounds every weight to one of 16
levels per group of 32. When the rounding error is as large as the move, int4 weights no longer hold
what uptraining learned. For the layer matrices of STUDENT (uptrained from SOURCE) this prints, as
fractions of the source's RMS: how far uptraining moved them, the int4 rounding error of the student
(`subllm.inference.quantize.int4_codes`, fp32 scales), and how much of the move is left after int4
rounding (|int4(w) - w_source| / |w - w_source|); with --text, the student's loss with its layers
replaced by their int4 values in fp32 (the slow reference path: no kernel involved) beside the
unquantized loss.

    python benchmarks/int4_vs_uptraining.py STUDENT SOURCE [--text REGISTER] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse

import torch

from subllm.data.tokenizer import load_tokenizer_for
from subllm.evals.decompose import mean_loss
from subllm.evals.suite import text_windows
from subllm.evals.tasks import read_texts
from subllm.inference.int4_correction import layer_linears
from subllm.inference.quantize import int4_codes, int4_dequantize
from subllm.model.subllm import load_model


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("student")
    ap.add_argument("source")
    ap.add_argument("--text", help="a held-out register (.txt file or folder) for the loss")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    student = load_model(a.student)
    src = layer_linears(load_model(a.source))
    mine = layer_linears(student)
    if src.keys() != mine.keys():
        raise SystemExit("the two models' layers differ: STUDENT must be uptrained from SOURCE")
    moved = err = left = base = 0.0
    q = {}
    for name, lin in mine.items():
        w, w0 = lin.weight.float(), src[name].weight.float()
        q[name] = int4_dequantize(*int4_codes(w))
        moved += float((w - w0).pow(2).sum())
        err += float((q[name] - w).pow(2).sum())
        left += float((q[name] - w0).pow(2).sum())
        base += float(w0.pow(2).sum())
    print(
        f"{len(mine)} layer matrices, as fractions of the source's RMS: uptraining moved them "
        f"{(moved / base) ** 0.5:.4f}; int4 rounding error {(err / base) ** 0.5:.4f}; "
        f"|int4(w) - w_source| / |w - w_source| = {(left / moved) ** 0.5:.3f}"
    )
    if a.text:
        tok = load_tokenizer_for(a.student)
        windows = text_windows(student, tok, read_texts(a.text), 512, 4, a.max_tokens)
        before = mean_loss(student, windows)
        for name, lin in mine.items():
            lin.weight.copy_(q[name])
        after = mean_loss(student, windows)
        print(
            f"loss on {a.text} ({a.max_tokens} tokens, fp32): {before:.4f}; layers at their int4 values "
            f"{after:.4f} ({(after / before - 1) * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
