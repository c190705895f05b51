"""Weight-only quantization for decoding (issue 22 item 2): `--quantize int8 | int4`.

A decode step reads every weight it passes for a few rows of activations, so its limit is bytes
read (subllm/bench/roofline.py); int8 weights read a quarter of fp32's, int4 an eighth.

`Int8Linear` stores q = round(w / s) in int8 with one fp32 scale per output channel,
s = max|w_row| / 127, and computes y = (x @ q^T) * s = x @ (q * s)^T (per-output-channel scales
commute with the matmul; `Int8Linear.dequantized` is the slow path the tests compare against). The
rounding error per weight is at most s / 2, so |y - x @ w^T|_j <= s_j / 2 * sum_i |x_i|. Three
kernels compute it:
- "packed": torch's CPU kernel `_weight_int8pack_mm` (int8 weights, bf16 activations and scales,
  fp32 accumulation), in decode steps (`decode_kernels`, entered by engine.decode_step). The
  activations are rounded to bf16 on the way in (relative error <= 2^-9), the output to bf16.
- "dynamic": int8 activations x int8 weights through fbgemm (subllm/inference/int8_dynamic.py;
  activations quantized per row in two passes, error <= 6.2e-5 of the row's max|x|), in decode
  steps - several times faster than "packed" on the LM head where fbgemm exists.
- "native": the native VNNI kernel (subllm/inference/native.py; activations rounded to int8 per
  group of 32 inputs, llama.cpp's precision), in decode steps, where the CPU has AVX512-VNNI.
- "cast": the int8 matrix cast to x's dtype block by block of output channels (at most BLOCK =
  2^20 weights, a 4 MiB transient copy that stays in cache) and an ordinary matmul - prefill, and
  decode where no decode kernel is fast. `quantize_` times them all on the model's largest
  layer at one row (a few milliseconds, interleaved rounds) and takes the fastest decode kernel
  ("native" if within NATIVE_MARGIN of it; int8_choice.py) unless it is
  more than PACKED_MARGIN times slower than cast: which one wins depends on the CPU (measured on
  an AMD EPYC with AVX512-BF16: packed 0.095 ms, cast 0.26 ms, fp32 weights 0.15 ms for a
  3072 x 576 matrix; the 49,152 x 576 head packed 4.2 ms, dynamic 1.1-1.6 ms; bf16 is ~80x slower
  on AVX2-only parts), and a default must not assume a fast machine. The margin: the isolated
  timing flatters "cast" - the layer stays in L3 between repetitions - and for SmolLM2's int8
  head the packed and cast kernels timed 3.8-4.3 vs 4.4-4.5 ms, a coin toss, while a real decode
  step with the cast head took 108 ms per token against 22 ms with the packed one.

`Int4Linear` (group size GROUP = 32, asymmetric, as llama.cpp's Q4_1): each group of 32 weights
of a row gets a scale and an offset, w ~ (c - 8) * scale + zero with codes c in 0..15
(`int4_codes`; the range of each group is searched among a few shrinkages of [min, max] for the
least squared error). Prefill and full forwards compute through torch's CPU kernel
`_weight_int4pack_mm_for_cpu` (bf16 activations, scales and offsets; at 512 rows as fast as fp32
weights); decode steps through the native VNNI kernel where it runs (`int4_kernel`: auto = native
there; its own copy of the codes, another eighth of fp32's bytes), about 2x faster at one row.

With `int4_rank` each int4 layer also adds a low-rank int8 correction of what its rounding lost,
optionally on the grid of the model's source (`int4_base`; subllm/inference/int4_correction.py):
what keeps an uptrained model's int4 loss near its fp32 one.

`quantize_` replaces, in place, every nn.Linear of the transformer layers (wqkv, wo, w13, w2) and
the LM head (a tied head gets its own copy, the embedding stays as it is). With int4 the head
stays int8: it is the layer whose rounding costs the most loss (measured in docs/RESULTS.md), and
so does a layer whose shape the int4 kernel cannot hold (`int4_fits`; listed in
`model.int4_fallback`).
Score layers stay fp32 (selection decisions, tiny). The model is for inference only afterwards:
it has no trainable weights in those layers and saving it is refused.

Why not torchao (PyPI torchao==0.18.0, checked with torch 2.13.0 CPU in a scratch directory): its
int8 weight-only config computes the same thing on CPU, but its int4 needs `mslk` (CUDA packages)
or a CUDA device, and once installed transformers imports it in every process that loads a
tokenizer or model, where it logs failed loads of its CUDA extensions to stderr - that broke
`subllm serve`'s first-line banner. The two kernels above ship with torch itself.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subllm.errors import SubLLMError
from subllm.inference import native
from subllm.inference.int4_correction import base_weights, lowrank_factors, parse_spec, resolve_base
from subllm.inference.int8_choice import choose_int8_kernel

QUANTIZE = ("none", "int8", "int4")
INT8_KERNELS = ("cast", "packed", "dynamic", "native")
INT4_KERNELS = ("torch", "native")
GROUP = 32  # int4 weights per scale / offset
_decoding = False  # inside `decode_kernels()`


@contextmanager
def decode_kernels():
    """Within it, int8 and int4 layers compute through their decode kernel whatever the
    number of rows; outside (prefill, eval, a forward pass) through "cast". Entered by
    engine.decode_step and around a prefill's last-token head (one row per sequence, as in a decode
    step; that head through "cast" made an 8-token int8 prefill of SmolLM2 111 ms instead of 58).
    The phase decides, not the row count, so a request computes the same alone or batched with
    others: with a row-count rule a short prompt prefilled alone took the decode kernel and the
    same prompt in a batch the cast one (logits 2e-3 apart with the packed kernel)."""
    global _decoding
    before, _decoding = _decoding, True
    try:
        yield
    finally:
        _decoding = before


class NativeCopy:
    """A layer's copy of its weights in a native kernel's layout (subllm/inference/native.py), held
    as non-persistent buffers native_0, native_1, ...; `native` is the tuple of them (None before
    `hold_native`). Buffers move with .to() and deep copies, and torch.compile treats them as the
    module's static state - as plain tensor attributes they were dynamic-shape graph inputs with
    ~1,200 symbolic shape guards on SmolLM2's decode graph (no measurable time per token, though)."""

    native_count = 0

    @property
    def native(self) -> tuple[Tensor, ...] | None:
        return tuple(getattr(self, f"native_{i}") for i in range(self.native_count)) or None

    def hold_native(self, tensors: tuple[Tensor, ...]) -> None:
        for i, t in enumerate(tensors):
            self.register_buffer(f"native_{i}", t, persistent=False)
        self.native_count = len(tensors)

    def drop_native(self) -> None:
        for i in range(self.native_count):
            del self._buffers[f"native_{i}"]
        self.native_count = 0


def _int8_after_load(mod: Int8Linear, _incompatible) -> None:
    """load_state_dict wrote q and scale in place: rebuild what is derived from them (the bf16
    scales, fbgemm's and the native kernel's copies) - in place where it has a place, so that the
    native runs of layers (native_layers.py), which hold those tensors, read the new weights."""
    mod.scale_bf16.copy_(mod.scale.to(torch.bfloat16))
    if mod.dynamic_packed is not None:
        from subllm.inference import int8_dynamic

        mod.dynamic_packed = int8_dynamic.prepack(mod.q, mod.scale)
        mod.dynamic_key = int8_dynamic.register(mod)
    if mod.native is not None:
        for held, new in zip(mod.native, native.int8_pack(mod.q, mod.scale)):
            held.copy_(new)


def _int4_after_load(mod: Int4Linear, _incompatible) -> None:
    """load_state_dict wrote the packed codes and scales: the native copy cannot be rebuilt from
    torch's packed layout (the codes are not kept), so the layer decodes through torch's int4
    kernel from then on - correct, slower; quantizing after loading keeps the native kernel."""
    if mod.native is not None:
        mod.drop_native()
        mod.kernel = "torch"
        warnings.warn(
            "subllm: weights loaded into an int4 layer; its native decode copy cannot be rebuilt, so it "
            "decodes through torch's int4 kernel (load the weights before quantizing to keep it)",
            stacklevel=2,
        )


class Int8Linear(NativeCopy, nn.Module):
    """A bias-free linear layer with int8 weights q (out, in) and fp32 scales s (out,)."""

    BLOCK = 1 << 20  # weights cast per matmul call: blocks of output channels of at most this many

    def __init__(self, q: Tensor, scale: Tensor, kernel: str = "cast"):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise SubLLMError("Int8Linear needs q int8 (out, in) and scale (out,)")
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.float())
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
        self.dynamic_packed = self.dynamic_key = None  # fbgemm's copy, made when first chosen
        # self.native: the native VNNI kernel's (tiles, scale), made when first chosen
        self.kernel = kernel  # in decode steps (`decode_kernels`): cast | packed | dynamic | native
        self.register_load_state_dict_post_hook(_int8_after_load)

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in INT8_KERNELS:
            raise SubLLMError(f"int8 kernel must be one of {', '.join(INT8_KERNELS)}, got {name!r}")
        if name == "dynamic" and self.dynamic_packed is None:
            from subllm.inference import int8_dynamic

            if not int8_dynamic.available() or self.in_features < 2:
                raise SubLLMError("the dynamic int8 kernel needs fbgemm (x86 torch) and in_features >= 2")
            self.dynamic_packed = int8_dynamic.prepack(self.q, self.scale)
            self.dynamic_key = int8_dynamic.register(self)
        if name == "native" and self.native is None:
            if not (native.vnni_available() and native.vnni_fits(self.out_features, self.in_features)):
                raise SubLLMError(
                    "the native int8 kernel needs AVX512-VNNI, the extension built (subllm/inference/"
                    "native.py), out_features divisible by 16 and in_features by 32"
                )
            self.hold_native(native.int8_pack(self.q, self.scale))
        self._kernel = name

    def __setstate__(self, state) -> None:  # a deep copy gets its own key (int8_dynamic.register)
        super().__setstate__(state)
        if self.dynamic_packed is not None:
            from subllm.inference import int8_dynamic

            self.dynamic_key = int8_dynamic.register(self)

    @classmethod
    def from_linear(cls, lin: nn.Linear, kernel: str = "cast") -> Int8Linear:
        if lin.bias is not None:
            raise SubLLMError("Int8Linear: linear layers with a bias are not supported")
        return cls.from_weight(lin.weight, kernel)

    @classmethod
    def from_weight(cls, w: Tensor, kernel: str = "cast") -> Int8Linear:
        w = w.detach().float()
        scale = w.abs().amax(1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, kernel)

    def decode_nbytes(self) -> int:
        """Bytes a decode step reads (subllm/bench/roofline.py): the int8 weights and the scales of
        the kernel in use (bf16 for the packed one, fp32 for the cast and dynamic ones)."""
        if self.kernel == "native":
            return sum(t.numel() * t.element_size() for t in self.native)
        scale = self.scale_bf16 if self.kernel == "packed" else self.scale
        return self.q.numel() + scale.numel() * scale.element_size()

    def dequantized(self) -> Tensor:
        """The weight this layer multiplies by, (out, in) fp32: q * s."""
        return self.q.float() * self.scale[:, None]

    def forward_cast(self, x: Tensor) -> Tensor:
        rows = max(1, self.BLOCK // self.in_features)
        if rows >= self.out_features:
            y = F.linear(x, self.q.to(x.dtype))
        else:  # the cast copy of one block at a time stays in cache (the LM head would be 113 MB)
            y = torch.cat(
                [F.linear(x, self.q[i : i + rows].to(x.dtype)) for i in range(0, self.out_features, rows)], -1
            )
        return y * self.scale.to(y.dtype)

    def forward_packed(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(x2, self.q, self.scale_bf16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_dynamic(self, x: Tensor) -> Tensor:
        from subllm.inference.int8_dynamic import matmul

        y = matmul(x.reshape(-1, self.in_features), self.dynamic_key)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_native(self, x: Tensor) -> Tensor:
        y = native.int8_matmul(x.reshape(-1, self.in_features), *self.native, native.ACT_PASSES)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if _decoding and self.kernel != "cast":
            return getattr(self, f"forward_{self.kernel}")(x)
        return self.forward_cast(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({self.kernel})"


def int4_codes(w: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in) -> (codes (out, in) int32 in 0..15, scale, zero (out, in / group) fp32) with
    w ~ (codes - 8) * scale + zero per group of `group` weights along `in`. Each group's range is
    the shrinkage of [min, max] (factors 1.0 .. 0.8) with the least squared rounding error."""
    N, K = w.shape
    if K % group:
        raise SubLLMError(f"int4 needs in_features divisible by {group}; a layer has {K}")
    g = w.detach().float().reshape(N, K // group, group)
    lo0, hi0 = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best = None
    for f in (1.0, 0.95, 0.9, 0.85, 0.8):
        lo = mid - f * half
        scale = (2 * f * half / 15).clamp(min=1e-10)
        c = torch.round((g - lo) / scale).clamp(0, 15)
        err = ((c * scale + lo - g) ** 2).sum(-1, keepdim=True)
        if best is None:
            best = [err, c, scale, lo]
        else:
            better = err < best[0]
            for i, new in enumerate((err, c, scale, lo)):
                best[i] = torch.where(better, new, best[i])
    _, c, scale, lo = best
    zero = lo + 8 * scale  # the kernel's convention: w = (c - 8) * scale + zero
    return c.to(torch.int32).reshape(N, K), scale[..., 0], zero[..., 0]


def int4_dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The slow path: the weights (out, in) fp32 that int4 codes stand for."""
    N, K = codes.shape
    group = K // scale.shape[1]
    c = codes.float().reshape(N, K // group, group)
    return ((c - 8) * scale[..., None] + zero[..., None]).reshape(N, K)


def int4_fits(lin: nn.Linear, group: int = GROUP) -> bool:
    """Whether `lin`'s shape fits the int4 kernel: in_features a multiple of `group`, out_features
    of 16 (its tiles)."""
    return lin.in_features % group == 0 and lin.out_features % 16 == 0


class Int4Linear(NativeCopy, nn.Module):
    """A bias-free linear layer with int4 weights in torch's CPU packed layout (`int4_codes`)."""

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        zero: Tensor,
        kernel: str = "auto",
        correction: tuple[Int8Linear, Int8Linear] | None = None,
    ):
        super().__init__()
        # y += up(down(x)): a low-rank int8 correction of the rounding (int4_correction.py), or None
        self.register_module("down", None if correction is None else correction[0])
        self.register_module("up", None if correction is None else correction[1])
        self.out_features, self.in_features = codes.shape
        self.group = self.in_features // scale.shape[1]
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (in / group, out, 2)
        self.register_buffer("scale_zero", sz.to(torch.bfloat16))
        if kernel not in ("auto", *INT4_KERNELS):
            raise SubLLMError(f"int4 kernel must be auto, {', '.join(INT4_KERNELS)}; got {kernel!r}")
        # self.native: (tiles, d, m), the native VNNI kernel's copy, for decode steps
        if kernel != "torch" and self.group == native.GROUP and native.vnni_available():
            self.hold_native(native.int4_pack(codes, scale, zero))
        elif kernel == "native":
            raise SubLLMError("the native int4 kernel needs AVX512-VNNI and the extension (native.py)")
        self.kernel = "native" if self.native is not None else "torch"  # in decode steps
        self.register_load_state_dict_post_hook(_int4_after_load)

    def decode_nbytes(self) -> int:
        """Bytes a decode step reads (subllm/bench/roofline.py): the copy its decode kernel uses."""
        own = self.native if self.native is not None else (self.packed, self.scale_zero)
        return sum(t.numel() * t.element_size() for t in own)

    @classmethod
    def from_linear(
        cls,
        lin: nn.Linear,
        group: int = GROUP,
        kernel: str = "auto",
        rank: int = 0,
        base: Tensor | None = None,
    ) -> Int4Linear:
        """`rank` > 0: with a rank-`rank` correction of W - Q (int4_correction.py); `base`: a weight of
        the same shape whose int4 codes Q are (the source of an uptrained model), else W's own."""
        if lin.bias is not None:
            raise SubLLMError("Int4Linear: linear layers with a bias are not supported")
        if not int4_fits(lin, group):
            raise SubLLMError(
                f"int4 needs in_features divisible by {group} and out_features by 16; a layer has "
                f"{lin.in_features} -> {lin.out_features}"
            )
        w = lin.weight.detach().float()
        if base is not None and base.shape != w.shape:
            raise SubLLMError(
                f"int4 base weight {tuple(base.shape)} does not match the layer's {tuple(w.shape)}"
            )
        codes = int4_codes(w if base is None else base, group)
        # a weight on its grid but for float rounding of the scales (~1e-7 of it) gets no correction
        tol = 1e-5 * float(w.abs().max())
        factors = lowrank_factors(w - int4_dequantize(*codes), rank, tol) if rank else None
        correction = None if factors is None else tuple(Int8Linear.from_weight(f) for f in factors)
        return cls(*codes, kernel, correction)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        if _decoding and self.native is not None:
            y = native.int4_matmul(x.reshape(-1, self.in_features), *self.native, native.ACT_PASSES)
            return self._corrected(x, y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        return self._corrected(x, y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))

    def _corrected(self, x: Tensor, y: Tensor) -> Tensor:
        return y if self.down is None else y + self.up(self.down(x))

    def extra_repr(self) -> str:
        rank = "" if self.down is None else f", rank-{self.down.out_features} correction"
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int4 group {self.group}{rank}"


def _linears(model):
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    yield parent, name, child


def quantize_(
    model,
    kind: str = "int8",
    head: bool = True,
    int8_kernel: str = "auto",
    int4_kernel: str = "auto",
    int4_rank: int = 0,
    int4_base: dict[str, Tensor] | None = None,
):
    """Replace the linear layers of `model`'s transformer layers (and its LM head) by quantized
    ones, in place; -> the model (marked `model.quantization`, eval mode). `int8_kernel`: auto
    (measured, see the module docstring) | packed | dynamic | native | cast; `int4_kernel` (decode
    steps of int4 layers): auto (native where it runs) | torch | native. `int4_rank`, `int4_base`
    ({"layers.3.attn.wqkv": weight}, int4_correction.base_weights): each int4 layer's low-rank
    correction and the weights its int4 grid comes from (int4_correction.py)."""
    if getattr(model, "quantization", None):
        raise SubLLMError(f"the model is already quantized ({model.quantization})")
    if kind not in QUANTIZE[1:]:
        raise SubLLMError(f"quantization must be int8 or int4, got {kind!r}")
    if int8_kernel not in ("auto", *INT8_KERNELS):
        raise SubLLMError(f"int8_kernel must be auto, {', '.join(INT8_KERNELS)}; got {int8_kernel!r}")
    if (int4_rank or int4_base) and kind != "int4":
        raise SubLLMError("int4_rank and int4_base apply to int4 quantization")
    names = {id(m): n for n, m in model.named_modules()}
    model.int4_fallback = []  # int4 layers whose shape the packed layout cannot hold: int8 instead
    for parent, name, child in list(_linears(model)):
        if kind == "int4" and int4_fits(child):
            base = None
            if int4_base is not None:
                base = int4_base.get(names[id(child)])
                if base is None:
                    where = names[id(child)]
                    raise SubLLMError(f"the int4 base has no layer {where}: is it the model's source?")
            layer = Int4Linear.from_linear(child, kernel=int4_kernel, rank=int4_rank, base=base)
            setattr(parent, name, layer)
        else:
            if kind == "int4":
                model.int4_fallback.append(tuple(child.weight.shape))
            setattr(parent, name, Int8Linear.from_linear(child))
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if int4:
        model.int4_kernel = int4[0].kernel
    if head:
        model.head = Int8Linear.from_linear(model.head)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if int8:
        kernel = int8_kernel
        if int8_kernel == "auto":
            kernel = choose_int8_kernel(max(int8, key=lambda m: m.q.numel()))
        for m in int8:
            try:
                m.kernel = kernel
            except SubLLMError:  # a shape the chosen kernel cannot hold (native: 16-row tiles)
                if int8_kernel != "auto":
                    raise
                m.kernel = "cast"
        model.int8_kernel = kernel
    model.quantization = kind
    model.int4_rank = int4_rank
    model.save_pretrained = _refuse_save
    return model.eval()


def quantize_int8_(model, head: bool = True, int8_kernel: str = "auto"):
    return quantize_(model, "int8", head, int8_kernel)


def _refuse_save(*args, **kwargs):
    raise SubLLMError("a weight-quantized model is for inference only: save the unquantized one")


def describe(model) -> str:
    """'' for an unquantized model, else e.g. "int4 weights (int4 decode kernel: native; int8
    decode kernel: dynamic)"."""
    q = getattr(model, "quantization", None)
    if not q:
        return ""
    kernels = [
        f"{k} decode kernel: {getattr(model, k + '_kernel')}"
        for k in ("int4", "int8")
        if hasattr(model, k + "_kernel")
    ]
    rank = getattr(model, "int4_rank", 0)
    fix = f" with rank-{rank} corrections" if rank else ""
    return f"{q} weights{fix}" + (f" ({'; '.join(kernels)})" if kernels else "")


def apply_quantization(model, name: str):
    """`--quantize none | int8 | int4`, or an int4 spec with a correction ("int4:rank=64:base=PATH",
    int4_correction.spec) -> the model (unchanged for none)."""
    kind, rank, base = parse_spec(name)
    base = resolve_base(model, base)
    if kind not in QUANTIZE:
        raise SubLLMError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {name!r}")
    if kind == "none":
        return model
    return quantize_(model, kind, int4_rank=rank, int4_base=None if base is None else base_weights(base))
