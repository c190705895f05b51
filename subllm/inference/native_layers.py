"""Decode through runs of layers in one native call (issue 22; csrc/decode_layers.cpp).

A decode step of SmolLM2-135M spends as long between its kernels as in them: ~20 dispatched ops
per layer through Python (or, with --compile, a graph's guards and small kernels), ~4 ms of a
~10 ms token at one thread. `decode_layers` runs a whole run of consecutive layers of one level -
norms, fused QKV, RoPE, the cache store, attention, output projection, SwiGLU, residuals - as one
op: the element-wise steps are loops over the few rows of a step, the linear layers go straight to
the native int4 / int8 kernels (or the dense fp32 one, native.py dense_matmul), the attention to
the native kernel. The engine (engine.py `_decode_level`) takes this path wherever `usable` says so and
every layer of the run is `layer_args`-eligible; layers of another kind and the head stay as they
were. Around the runs, the same steps take `final_norm` (the model's last RMSNorm) and, for a
plain S, `decide` (score layer and clamp) and `bypass` (U + B) - one native op each instead of
~6, ~8 and ~4 dispatched ones. The eager per-layer path is the reference the tests compare with.

Eligible: fp32 activations without autocast on a CPU where the extension loads, plain `Block`s
(RMSNorm, Attention, SwiGLU), each linear a dense fp32 `nn.Linear`, an int4 layer with its native
copy or an int8 layer whose decode kernel is "native" (quantize.py). `model.native_layers = False`
turns the path off (benchmarks A/B it).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from subllm.config import Sub
from subllm.inference import native
from subllm.inference.quantize import Int4Linear, Int8Linear
from subllm.model.layers import Attention, Block, RMSNorm, SwiGLU
from subllm.model.subsample import ScoreLinear, Subsample

DENSE, INT4, INT8 = 0, 1, 2  # csrc/decode_layers.cpp's kinds of linear layer


def usable(model: nn.Module, x: Tensor) -> bool:
    """Whether this step may take the native path at all (per-layer eligibility aside)."""
    return (
        getattr(model, "native_layers", True)
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()  # the op has no autograd formula; decoding runs under no_grad
        and native.available(x.device)
    )


def status(device: torch.device | str = "cpu") -> str:
    """One line for reports: which path fp32 decode steps take here."""
    if torch.device(device).type == "cpu" and native.available(device):
        return "native runs of layers (fp32 decode)"
    return "per-layer ops"


def _linear(lin: nn.Module) -> tuple[int, tuple[Tensor, ...]] | None:
    """(kind, its nine tensors: the weight's three, then an int4 layer's correction's D and U
    (int4_correction.py) as native int8 tiles, or six empty tensors), or None if not eligible. An
    int8 copy is two tensors (tiles, scale): an empty third pads it to three."""
    if type(lin) is nn.Linear:
        w = lin.weight
        if lin.bias is None and w.dtype == torch.float32 and w.is_contiguous():
            return DENSE, (w, *[w.new_empty(0)] * 8)
        return None
    if isinstance(lin, Int4Linear) and lin.native is not None:
        if lin.down is None:
            return INT4, (*lin.native, *[lin.native[0].new_empty(0)] * 6)
        if lin.down.kernel == "native" and lin.up.kernel == "native":
            return INT4, (*lin.native, *_three(lin.down.native), *_three(lin.up.native))
        return None
    if isinstance(lin, Int8Linear) and lin.kernel == "native":
        return INT8, (*_three(lin.native), *[lin.native[0].new_empty(0)] * 6)
    return None


def _three(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A native copy padded with empty tensors to a linear's three (csrc/decode_layers.cpp)."""
    return (*tensors, *[tensors[0].new_empty(0)] * (3 - len(tensors)))


def layer_args(block: nn.Module) -> tuple[list[Tensor], list[int]] | None:
    """One layer's 38 tensors and 4 kinds (csrc/decode_layers.cpp), or None if it is not eligible."""
    if not (
        type(block) is Block
        and type(block.attn) is Attention
        and type(block.ffn) is SwiGLU
        and type(block.attn_norm) is RMSNorm
        and type(block.ffn_norm) is RMSNorm
    ):
        return None
    norms = [block.attn_norm.weight, block.ffn_norm.weight]
    if any(w.dtype != torch.float32 for w in norms):
        return None
    tensors, kinds = list(norms), []
    for lin in (block.attn.wqkv, block.attn.wo, block.ffn.w13, block.ffn.w2):
        got = _linear(lin)
        if got is None:
            return None
        kinds.append(got[0])
        tensors.extend(got[1])
    return tensors, kinds


def _stamp(block: nn.Module) -> tuple:
    """What `layer_args` read, from module dicts (not nn.Module.__getattr__): the id of one tensor
    it passes per module (the cached list holds it, so the id cannot be reused while the entry
    lives) and the int8 kernels. A replaced module, weight or native copy (quantize_, model.to()
    rebuilding buffers, a kernel change) changes it; a weight changed in place (load_state_dict,
    `.data =`) needs no rebuild: the op reads the tensor itself."""
    m = block._modules
    a, f = m.get("attn"), m.get("ffn")
    if a is None or f is None:
        return (id(block),)
    out: list = [id(block)]
    for mod in (m.get("attn_norm"), m.get("ffn_norm"), *(a._modules.get(n) for n in ("wqkv", "wo")),
                *(f._modules.get(n) for n in ("w13", "w2"))):  # fmt: skip
        if mod is None:
            return (id(block),)
        # a dense or norm weight, or a quantized layer's buffers (model.to() replaces the floating
        # ones - scales - and keeps the integer ones)
        own = mod._parameters.get("weight")
        if own is not None:
            out.append(id(own))
        else:
            for part in (mod, *(m for m in mod._modules.values() if m is not None)):  # + a correction
                out += map(id, part._buffers.values())
                out.append(part.__dict__.get("_kernel"))
    return tuple(out)


def runs(model: nn.Module, nodes: tuple, cache: object = None) -> dict[int, tuple]:
    """{first layer: (layers, their tensors and kinds bound for the op: `bind`)} for every maximal
    run of consecutive eligible layers among `nodes` (one level of the structure; an S ends a run).
    Kept on the model between steps while no layer's `_stamp` changes (building it every step cost
    ~0.4 ms of SmolLM2's token).
    The stamps are checked on the first step of each `cache` (the KV cache being decoded) and not
    again while the same cache decodes: inside a decode step the check cost as much again (~0.4 ms
    of a 6.5 ms SmolLM2 token - ~1,200 dict lookups on memory the weights had just evicted). So a
    module, weight or native copy *replaced* between two steps of one cache is used from the next
    cache on; a weight changed in place is seen at once (the op reads the tensor itself)."""
    kept = model.__dict__.setdefault("_native_runs", {})
    got = kept.get(nodes)  # the tuple itself (hashable: ints and frozen Subs), not its id
    if got is not None and cache is not None and got[2] is not None and got[2]() is cache:
        return got[1]
    layers = model._modules["layers"]
    stamp = tuple([_stamp(layers[n]) for n in nodes if type(n) is int])
    out = got[1] if got is not None and got[0] == stamp else _build_runs(model, nodes)
    kept[nodes] = (stamp, out, None if cache is None else weakref.ref(cache))
    return out


def _build_runs(model: nn.Module, nodes: tuple) -> dict[int, tuple]:
    out: dict[int, tuple[list[int], list[Tensor], list[int]]] = {}
    cur: tuple[list[int], list[Tensor], list[int]] | None = None
    for node in nodes:
        got = None if isinstance(node, Sub) else layer_args(model.layers[node])
        if got is None:
            cur = None
            continue
        if cur is None:
            cur = ([], [], [])
            out[node] = cur
        cur[0].append(node)
        cur[1].extend(got[0])
        cur[2].extend(got[1])
    return {k: (layers, bind(tensors, kinds)) for k, (layers, tensors, kinds) in out.items()}


def bind(tensors: list[Tensor], kinds: list[int]) -> torch.ScriptObject:
    """A run's weights and kinds as the op takes them (csrc/decode_layers.cpp `LayerWeights`): held
    once, not converted from a list of ~1,100 tensors on every step."""
    return torch.classes.subllm_native.LayerWeights(tensors, kinds)


def run(
    model: nn.Module,
    run_args: tuple,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    rows: Tensor,
    slots: Tensor,
    lens: Tensor,
    ks: list[Tensor],
    vs: list[Tensor],
) -> Tensor:
    """run_args: (layers, their `bind`) of `runs`; x (n, 1, C), cos / sin (n, 1,
    head_dim); rows, slots, lens (n,) int64 (each row's cache row, the slot its new K/V go to, and its
    length after it); ks / vs the run's cache buffers -> x after the run's layers (n, 1, C). The cache
    stores happen inside."""
    c = model.config  # every Block's norms and heads come from it (subllm/model/layers.py)
    y = torch.ops.subllm_native.decode_layers(
        x[:, 0],
        cos[:, 0],
        sin[:, 0],
        rows,
        slots,
        lens,
        run_args[1],
        ks,
        vs,
        c.norm_eps,
        c.n_heads,
        native.ACT_PASSES,
    )
    return y[:, None]


def final_norm(model: nn.Module, x: Tensor) -> Tensor:
    """model.norm(x) for a decode step's rows x (n, C): through the native RMSNorm (the loop the runs
    of layers use, one op instead of ~6) where the step takes the native path."""
    norm = model._modules["norm"]
    if type(norm) is RMSNorm and norm.weight.dtype == torch.float32 and usable(model, x):
        return torch.ops.subllm_native.rms_norm(x, norm.weight, norm.eps)
    return norm(x)


def head(model: nn.Module, x: Tensor) -> Tensor:
    """model.head(x) for a decode step's rows x (n, C): a dense fp32 head through the native matmul
    (each row's logits as it would get them alone) where the step takes the native path."""
    lin = model._modules["head"]
    w = getattr(lin, "weight", None)
    if type(lin) is nn.Linear and lin.bias is None and w.dtype == torch.float32 and w.is_contiguous():
        if usable(model, x):
            return native.dense_matmul(x, w)
    return lin(x)


def decide(sub: nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Subsample.decide for one token per row x (n, 1, C) through the native op (csrc/decode_select.cpp):
    (scores d, weights w), (n, 1) each; None where the S is of another kind (an `M` router) or its
    score layer is not fp32 - the caller then takes sub.decide."""
    score = sub._modules.get("score") if type(sub) is Subsample else None
    if type(score) is not ScoreLinear or score.weight.dtype != torch.float32:
        return None
    bias = score.bias if score.bias is not None else score.weight.new_empty(0)
    out = torch.ops.subllm_native.decode_decide(
        x[:, 0], score.weight[0], bias, score.eps if score.norm else -1.0
    )
    return out[:, :1], out[:, 1:]


def bypass(x: Tensor, h: Tensor, w: Tensor, scale: Tensor) -> Tensor:
    """U + B of a decode step, x + (w * (h - x)) * scale, for x, h (n, 1, C) fp32, w (n, 1) and the
    bypass scale (C,), in one native op."""
    return torch.ops.subllm_native.decode_bypass(x[:, 0], h[:, 0], w[:, 0], scale)[:, None]
