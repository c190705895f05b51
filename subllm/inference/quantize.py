"""Weight-only int8 quantization for decoding (issue 22 item 2): `--quantize int8`.

A decode step reads every weight it passes for a few rows of activations, so its limit is bytes
read (subllm/bench/roofline.py); int8 weights read a quarter of fp32's. `Int8Linear` stores
q = round(w / s) in int8 with one fp32 scale per output channel, s = max|w_row| / 127, and computes
y = (x @ q^T) * s: the int8 matrix is cast to x's dtype block by block of output channels (at
most BLOCK = 2^20 weights, a 4 MiB transient copy that stays in cache; cast whole, SmolLM2's LM head
made a 113 MB copy per step and int8 decoded 2.2x slower than fp32, blocked 2x faster - measured on
a shared machine) and the scale is applied to the output - per-output-channel scales
commute with the matmul, so this is exactly x @ (q * s)^T, the dequantized weight
(`Int8Linear.dequantized`, the slow path the tests compare against). The rounding error per
weight is at most s / 2, so |y - x @ w^T|_j <= s_j / 2 * sum_i |x_i|.

`quantize_int8_` replaces, in place, every nn.Linear of the transformer layers (wqkv, wo, w13, w2)
and the LM head (`head=True`; a tied head gets its own int8 copy, the embedding stays as it is).
Score layers stay in fp32 (selection decisions, tiny). The model is for inference only afterwards:
it has no trainable weights in those layers and saving it is refused.

Why not torchao (PyPI torchao==0.18.0, checked with torch 2.13.0 CPU in a scratch directory): its
int8 weight-only config works on CPU and computes the same thing (cast the int8 weight, matmul,
scale), but int4 needs `mslk` (CUDA packages) or a CUDA device, and once it is installed
transformers imports it in every process that loads a tokenizer or model, where it logs failed
loads of its CUDA extensions to stderr - that broke `subllm serve`'s first-line banner. A 40-line
module of our own does what we need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subllm.errors import SubLLMError

QUANTIZE = ("none", "int8")


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights q (out, in) and fp32 scales s (out,)."""

    BLOCK = 1 << 20  # weights cast per matmul call: blocks of output channels of at most this many

    def __init__(self, q: Tensor, scale: Tensor):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise SubLLMError("Int8Linear needs q int8 (out, in) and scale (out,)")
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float())

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        if lin.bias is not None:
            raise SubLLMError("Int8Linear: linear layers with a bias are not supported")
        w = lin.weight.detach().float()
        scale = w.abs().amax(1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    def dequantized(self) -> Tensor:
        """The weight this layer multiplies by, (out, in) fp32: q * s."""
        return self.q.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        rows = max(1, self.BLOCK // self.in_features)
        if rows >= self.out_features:
            y = F.linear(x, self.q.to(x.dtype))
        else:  # the cast copy of one block at a time stays in cache (the LM head would be 113 MB)
            y = torch.cat(
                [F.linear(x, self.q[i : i + rows].to(x.dtype)) for i in range(0, self.out_features, rows)], -1
            )
        return y * self.scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8_(model, head: bool = True):
    """Replace the linear layers of `model`'s transformer layers (and its LM head) by Int8Linear,
    in place; -> the model (marked `model.quantization = "int8"`, eval mode)."""
    if getattr(model, "quantization", None):
        raise SubLLMError(f"the model is already quantized ({model.quantization})")
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, Int8Linear.from_linear(child))
    if head:
        model.head = Int8Linear.from_linear(model.head)
    model.quantization = "int8"
    model.save_pretrained = _refuse_save
    return model.eval()


def _refuse_save(*args, **kwargs):
    raise SubLLMError("a weight-quantized model is for inference only: save the unquantized one")


def apply_quantization(model, name: str):
    """`--quantize none | int8` -> the model (unchanged for none)."""
    if name not in QUANTIZE:
        raise SubLLMError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {name!r}")
    return model if name == "none" else quantize_int8_(model)
