"""A compiled decode step (issue 22 item 1): runs of layers as torch.compile'd graphs.

A decode step of SmolLM2-135M issues ~20 small ops per layer through Python and the dispatcher
(norms, RoPE, the cache write, attention, SwiGLU, residuals): ~600 per token, which costs about as
much as reading int4 weights. `compile_decode(model)` attaches compiled graphs that `decode_step`
(subllm/inference/engine.py) runs instead of the eager per-layer loop wherever it may:

- One graph per *segment*: a maximal run of consecutive layers of one level of the structure
  string, with no S in between (the all-T LLaMA is one segment of all its layers;
  `TT(TT(TT)TT)TT` has five). An S's decision, the rows it keeps and U + B stay eager between
  segments: they are data-dependent (a row that drops the token skips the inner levels), and they
  are a handful of ops per S.
- Only when the step feeds every row of the cache (batch 1 always; a full batch at level 0 and at
  inner levels when every row keeps the token); a subset of rows takes the eager path, which reads
  each row's cache through a view of its own length.
- Shapes are dynamic (`dynamic=True`): the context length and the batch size are symbols, so a
  growing cache does not recompile. The K/V write is an in-place indexed store into the cache's
  buffers (graph inputs), the attention reads exactly the first L slots (masked where rows differ
  in length), as the eager path does.

The eager path stays the reference: tests compare the two (logits, selections and cache contents).
Compiling takes time (inductor generates and builds C++; minutes on a 2-core machine for a
30-layer segment) once per model and process - worth it for serving and long generations, not for
one short prompt, so it is opt-in (`--compile` of generate / serve / bench infer).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from subllm.config import Sub
from subllm.errors import SubLLMError
from subllm.inference.native import decode_attention


class Segment(nn.Module):
    """Consecutive layers of one level, one new token per row for every row of the cache."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)  # the model's own modules (no copy of the weights)

    def forward(
        self,
        x: Tensor,  # (B, 1, C)
        cos: Tensor,  # (B, 1, head_dim)
        sin: Tensor,
        slots: Tensor,  # (B,) long: where each row's new K/V goes
        length: int,  # slots read by attention: max(slots) + 1
        mask: Tensor | None,  # (B, 1, 1, length) bool where row lengths differ, else None
        lens: Tensor | None,  # (B,) slots + 1: the native kernel's lengths (native.py), else None
        ks: list[Tensor],  # the cache's (B, Hkv, capacity, head_dim) buffers of these layers
        vs: list[Tensor],
    ) -> Tensor:
        rows = torch.arange(x.shape[0], device=x.device)
        for block, kb, vb in zip(self.blocks, ks, vs):
            q, k, v = block.attn.qkv(block.attn_norm(x), cos, sin)
            kb[rows, :, slots] = k[:, :, 0].to(kb.dtype)  # the cache may be bf16 (set_kv_dtype)
            vb[rows, :, slots] = v[:, :, 0].to(vb.dtype)
            if lens is not None:  # the native kernel (native.py): each row its own length, no mask
                a = block.attn.out(decode_attention(q, kb, vb, rows, lens))
            else:
                a = block.attn.attend(q, kb[:, :, :length], vb[:, :, :length], mask, is_causal=False)
            x = x + a
            x = x + block.ffn(block.ffn_norm(x))
        return x


def segments(tree: tuple) -> list[tuple[int, ...]]:
    """The layer indexes of every maximal run of consecutive layers in `tree` (all levels)."""
    out: list[tuple[int, ...]] = []

    def walk(nodes: tuple) -> None:
        run: list[int] = []
        for node in nodes:
            if isinstance(node, Sub):
                if run:
                    out.append(tuple(run))
                run = []
                walk(node.children)
            else:
                run.append(node)
        if run:
            out.append(tuple(run))

    walk(tree)
    return out


class CompiledDecode:
    """The compiled segments of one model: {first layer of a segment: (its layers, compiled fn)}."""

    def __init__(self, model, backend: str = "inductor"):
        self.by_first: dict[int, tuple[tuple[int, ...], object]] = {}
        for layers in segments(model.config.tree):
            seg = Segment([model.layers[i] for i in layers])
            fn = torch.compile(seg, backend=backend, dynamic=True, fullgraph=True)
            self.by_first[layers[0]] = (layers, fn)


def compile_decode(model, backend: str = "inductor"):
    """Attach compiled decode segments to `model` (in eval mode; kept if already attached); -> the
    model. `decode_step` then uses them; `model.compiled_decode = None` goes back to eager."""
    if getattr(model, "compiled_decode", None) is not None:
        return model
    if model.training:
        raise SubLLMError("compile_decode needs the model in eval mode (call model.eval())")
    if backend == "inductor" and model.embed.weight.device.type == "cpu":
        from subllm.trainer.compiled import cpu_compiler

        if cpu_compiler() is None:
            raise SubLLMError(
                "--compile on the CPU needs a C++ compiler for inductor (g++, c++ or clang++ on PATH, "
                "or $CXX); install one or drop --compile"
            )
    # one graph per distinct segment length, batch 1 or more, masked or not: more than the default
    # recompile limit for a nested structure (all segments share Segment.forward's code)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    model.compiled_decode = CompiledDecode(model, backend)
    return model


def compile_and_warm(model, dtype: str = "fp32", batch_sizes=(1, 2), steps: int = 2) -> float:
    """`compile_decode(model)`, then compile the graphs a decode in `dtype` (bf16 | fp32, the
    autocast it will run under) needs before it is timed or served: a few decode steps of a short
    dummy prompt at each batch size (batch 1 and more are separate graphs). Graphs of inner levels
    that the dummy tokens do not reach compile when a token first reaches them. -> seconds spent."""
    from subllm.dtype import autocast
    from subllm.inference.engine import decode_step, new_cache, prefill

    compile_decode(model)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(dtype, model.embed.weight.device.type):
        for B in batch_sizes:
            cache = new_cache(model, B)
            ids = torch.arange(1, 9, device=model.embed.weight.device).repeat(B, 1)
            logits = prefill(model, ids, None, cache)
            for _ in range(steps):
                logits = decode_step(model, cache, logits.argmax(-1))
    return time.perf_counter() - t0
