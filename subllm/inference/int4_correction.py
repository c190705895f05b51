"""A low-rank correction for int4 layers: `--quantize int4 --int4-rank R [--int4-base CKPT]`.

int4 rounds each weight to one of 16 levels per group of 32, an error of ~1% of the weights' RMS.
For a model uptrained from a 4-bit source (SmolLM2-135M comes as Q4_1) that is more than
uptraining moved the weights (0.89% RMS for the r = 0.64 SUBLLM of docs/RESULTS.md), and int4
rounds most of the move away: +29-38% held-out loss. Here an int4 layer computes

    y = x Q^T + (x D^T) U^T,    D (R, in) and U (out, R) int8 (quantize.py Int8Linear),

where U D is the best rank-R approximation (SVD) of the residual W - Q. Q comes from W itself
(a plain rounding; the residual is rounding noise plus what it erased), or with `base` from the
source model's weight, which for a source on a 4-bit grid is exact: then the residual is exactly
what uptraining moved, and its leading singular directions hold most of what it learned (on the
SUBLLM above, held-out loss on three registers: rank 32 / 64 of the move +0.8-1.7% / +0.45-0.86%;
the plain rounding plus rank 64 +0.6-1.3%; docs/RESULTS.md "int4 with a low-rank correction"). The
correction adds R (in + out) int8 bytes per linear layer (at R = 64, 15% more bytes per decoded token
of that SUBLLM, 17-18% slower decode than plain int4). A residual that is zero (a model already on its
int4 grid) gets no correction. Ranks that are multiples of 32 fit the native decode kernels.

The spec string that carries the choice through `generate`, `serve`, `eval` and `bench infer` is
"int4" or "int4:rank=R" or "int4:rank=R:base=PATH" (`spec`, `parse_spec`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from subllm.errors import SubLLMError


def lowrank_factors(residual: Tensor, rank: int, tol: float = 0.0) -> tuple[Tensor, Tensor] | None:
    """residual (out, in) -> (D (rank, in), U (out, rank)) fp32 with U D the best rank-`rank`
    approximation of it, each factor carrying the square root of the singular values (balanced
    ranges for their int8 rounding); None where no entry exceeds `tol` in magnitude."""
    r = residual.detach().float()
    if not bool(r.abs().max() > tol):
        return None
    rank = min(rank, *r.shape)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()


def spec(kind: str, rank: int = 0, base: str | Path | None = None) -> str:
    """--quantize, --int4-rank, --int4-base -> the one string apply_quantization takes."""
    if kind != "int4":
        if rank or base:
            raise SubLLMError("--int4-rank and --int4-base apply to --quantize int4")
        return kind
    if rank < 0:
        raise SubLLMError(f"--int4-rank must be >= 0, got {rank}")
    if base and not rank:
        raise SubLLMError(
            "--int4-base needs --int4-rank > 0: without a correction the int4 weights are the base's"
        )
    if base and base != "auto" and not (Path(base) / "config.json").is_file():
        raise SubLLMError(f"--int4-base: no checkpoint at {base} (expected a folder with config.json)")
    return kind + (f":rank={rank}" if rank else "") + (f":base={base}" if base else "")


def parse_spec(name: str) -> tuple[str, int, str | None]:
    """A spec -> (kind, rank, base): "int4:rank=64:base=runs/smol_llama" -> ("int4", 64,
    "runs/smol_llama"); "int8" -> ("int8", 0, None)."""
    kind, *opts = name.split(":")
    rank, base = 0, None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "rank" and value.isdigit():
            rank = int(value)
        elif key == "base" and value:
            base = value
        else:
            raise SubLLMError(f"bad quantization spec {name!r} (expected int4[:rank=R][:base=PATH])")
    if opts and kind != "int4":
        raise SubLLMError(f"bad quantization spec {name!r}: rank and base apply to int4")
    return kind, rank, base


def resolve_base(model, base: str | None) -> str | None:
    """--int4-base as given, or for "auto" the source `model` was uptrained from, as its config
    records it (`subllm train --init-from`: config.extra["init_from"])."""
    if base != "auto":
        return base
    record = model.config.extra.get("init_from") or {}
    path = record.get("path")
    if not path:
        raise SubLLMError("--int4-base auto: the checkpoint records no source (not uptrained: --init-from)")
    if record.get("kind") != "subllm" or not (Path(path) / "config.json").is_file():
        raise SubLLMError(
            f"--int4-base auto: the recorded source {path} is not a subllm checkpoint on this machine; "
            "pass its path (`subllm convert` makes one from a GGUF or Hugging Face Llama)"
        )
    return path


def layer_linears(model) -> dict[str, torch.nn.Linear]:
    """A model's unquantized linear layers inside its transformer layers, by name ("layers.3.attn.wqkv")."""
    mods = model.named_modules()
    return {n: m for n, m in mods if type(m) is torch.nn.Linear and n.startswith("layers.")}


def base_weights(path: str | Path) -> dict[str, Tensor]:
    """The weights of a checkpoint's `layer_linears`, for the int4 grid of the layers of a model
    uptrained from it."""
    from subllm.model.subllm import load_model

    return {name: mod.weight.detach().float() for name, mod in layer_linears(load_model(path)).items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--int4-rank and --int4-base, beside a parser's --quantize."""
    p.add_argument(
        "--int4-rank",
        type=int,
        default=0,
        help="with --quantize int4: add to each int4 layer a rank-R int8 correction of what the rounding "
        "lost (subllm/inference/int4_correction.py; 64 with --int4-base kept an uptrained SmolLM2 SUBLLM "
        "within 1%% of its fp32 loss, where plain int4 costs ~30%%); 0 (default): none",
    )
    p.add_argument(
        "--int4-base",
        help="with --int4-rank: the checkpoint the model was uptrained from (auto: the one its config "
        "records); its weights give the int4 grid and the correction holds the difference (exact for a "
        "source on a 4-bit grid, e.g. SmolLM2)",
    )


def from_args(args: argparse.Namespace) -> str:
    """The quantization spec of a parsed command line (--quantize, --int4-rank, --int4-base)."""
    return spec(args.quantize, getattr(args, "int4_rank", 0), getattr(args, "int4_base", None))
