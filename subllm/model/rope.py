"""RoPE scaling as Hugging Face defines it: `ModelConfig.rope_scaling` -> inverse frequencies.

`rope_scaling` is HF's `rope_parameters` dict without `rope_theta` (that is `ModelConfig.rope_theta`):
`{"rope_type": "linear" | "dynamic" | "yarn" | "llama3" | "default", <that type's parameters>}`;
None (or rope_type "default") is plain RoPE. The formulas follow transformers 5's
modeling_rope_utils.py (`_compute_*_parameters`), in the same float32 arithmetic, so that logits
equal `LlamaForCausalLM`'s:

- linear: every inverse frequency divided by `factor` (position interpolation).
- dynamic (NTK): for a sequence of `seq_len` > `original_max_position_embeddings` tokens the base
  becomes theta * (factor * seq_len / orig - (factor - 1)) ** (d / (d - 2)); up to orig it is plain
  RoPE. The frequencies depend on the current sequence length (see `inv_freq`).
- yarn: interpolation by `factor` for the low frequencies, none for the high ones, a linear ramp
  between (`beta_fast`, `beta_slow`, `truncate`), and an attention factor (from `attention_factor`,
  or 0.1 * ln(factor) + 1, or the `mscale` / `mscale_all_dim` ratio) that multiplies cos and sin.
- llama3: wavelengths above orig / low_freq_factor divided by `factor`, below orig /
  high_freq_factor unchanged, smoothly blended between.

`original_max_position_embeddings` defaults to the model's `max_seq_len` when absent (HF's
`max_position_embeddings`). Here `max_seq_len` is also the longest input the model accepts, so a
dynamic or yarn model that should run past its training length names the training length
explicitly, e.g. `{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}`
with max_seq_len 16384.

Positions are ORIGINAL positions at every nesting level (docs/method.md section 6); for "dynamic"
the sequence length is that of the full sequence (level 0), never of a subsampled level.

"dynamic", the choice made here. HF recomputes its frequencies from max(position_ids) + 1 of the
call: in a full forward every token of a sequence of n > orig tokens is rotated with the
frequencies of n; in its cached decode the prompt's keys keep the prompt length's frequencies and
each new token gets those of the length it makes. The two disagree past orig, and no KV cache can
reproduce the full forward there (the hidden states of every earlier token change with n, not only
its keys). So: the full forward (`SubLLM.forward`) equals HF's full forward, with the length taken
per row (max position of a real token + 1; HF takes the batch maximum, which makes a row depend on
its batch), and the cached engine equals HF's cached decode (prefill at the prompt's length, each
decoded token at its own). Both are stateless (HF's rotary module keeps the largest length seen
until a short call resets it). Up to orig both are plain RoPE and cached == uncached as without
scaling; tests/test_rope.py checks all three equalities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from subllm.errors import SubLLMError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# per type: (required keys, optional keys) besides rope_type, as HF validates them
_KEYS = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, {"original_max_position_embeddings"}),
    "yarn": (
        {"factor"},
        {
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        },
    ),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor"}, {"original_max_position_embeddings"}),
}


def check_rope_scaling(scaling: dict | None, rope_theta: float, max_seq_len: int) -> dict | None:
    """The normalised `rope_scaling` (a new dict; None for plain RoPE), or a clear SubLLMError.

    Accepts HF's spellings: the legacy key "type" for "rope_type", and "rope_theta" when it equals
    the config's. `original_max_position_embeddings` is filled in (default: max_seq_len)."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise SubLLMError(
            f"rope_scaling must be a dict (Hugging Face's rope_parameters) or None, got {scaling!r}"
        )
    d = dict(scaling)
    if "type" in d:
        d.setdefault("rope_type", d.pop("type"))
    theta = d.pop("rope_theta", None)
    if theta is not None and float(theta) != float(rope_theta):
        raise SubLLMError(f"rope_scaling has rope_theta {theta}, the config rope_theta {rope_theta}: set one")
    if d.pop("partial_rotary_factor", 1.0) != 1.0:
        raise SubLLMError(
            "rope_scaling partial_rotary_factor != 1 is not supported (RoPE rotates the whole head)"
        )
    kind = d.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise SubLLMError(
            f"rope_scaling rope_type {kind!r} is not supported; choose one of {', '.join(ROPE_TYPES)}"
        )
    d["rope_type"] = kind
    required, optional = _KEYS[kind]
    missing = sorted(required - set(d))
    unknown = sorted(set(d) - required - optional - {"rope_type"})
    if missing:
        raise SubLLMError(f"rope_scaling of rope_type {kind!r} needs {', '.join(missing)}")
    if unknown:
        raise SubLLMError(f"rope_scaling of rope_type {kind!r}: unknown key(s) {', '.join(unknown)}")
    if kind == "default":
        return d
    if not _number(d["factor"]) or d["factor"] < 1.0:
        raise SubLLMError(f"rope_scaling factor must be a number >= 1, got {d['factor']!r}")
    if kind == "linear":
        return d
    d.setdefault("original_max_position_embeddings", max_seq_len)
    orig = d["original_max_position_embeddings"]
    if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
        raise SubLLMError(
            f"rope_scaling original_max_position_embeddings must be a positive int, got {orig!r}"
        )
    for k in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
              "high_freq_factor"):  # fmt: skip
        if d.get(k) is not None and not _number(d[k]):
            raise SubLLMError(f"rope_scaling {k} must be a number, got {d[k]!r}")
    if kind == "llama3" and not d["high_freq_factor"] > d["low_freq_factor"]:
        raise SubLLMError("rope_scaling (llama3): high_freq_factor must exceed low_freq_factor")
    return d


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def is_dynamic(scaling: dict | None) -> bool:
    return scaling is not None and scaling.get("rope_type") == "dynamic"


def _plain(head_dim: int, theta, device) -> Tensor:
    """(head_dim / 2,) float32: 1 / theta ** (2i / head_dim), as HF computes it."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def inv_freq(
    head_dim: int, theta: float, scaling: dict | None, seq_len: Tensor | None = None, device=None
) -> tuple[Tensor, float]:
    """(inverse frequencies, attention factor). The frequencies are (head_dim / 2,) float32, or for
    "dynamic" with `seq_len` given, (B, head_dim / 2): one row per sequence, from that row's length
    `seq_len` (B,) (rows of at most `original_max_position_embeddings` tokens get plain RoPE).
    The attention factor multiplies cos and sin (yarn; 1.0 otherwise)."""
    kind = "default" if scaling is None else scaling["rope_type"]
    if kind == "default":
        return _plain(head_dim, theta, device), 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return _plain(head_dim, theta, device) / factor, 1.0
    orig = scaling["original_max_position_embeddings"]
    if kind == "dynamic":
        base = _plain(head_dim, theta, device)
        if seq_len is None:
            return base, 1.0
        n = seq_len.to(device=base.device).long()
        grown = torch.maximum(n, torch.tensor(orig, device=base.device))
        b = theta * ((factor * grown / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))  # (B,) float32
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=base.device).float() / head_dim
        scaled = 1.0 / (b[:, None] ** exponent)  # (B, head_dim / 2)
        return torch.where((n > orig)[:, None], scaled, base), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    return _llama3(head_dim, theta, scaling, device)


def _yarn(head_dim: int, theta: float, s: dict, device) -> tuple[Tensor, float]:
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over orig
        return (head_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    extrapolation = 1 - ramp  # share of the unscaled frequency, 1 for the high frequencies
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attn


def _llama3(head_dim: int, theta: float, s: dict, device) -> tuple[Tensor, float]:
    factor, orig = s["factor"], s["original_max_position_embeddings"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    inv = _plain(head_dim, theta, device)
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / lo, orig / hi
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


# parameters the short form TYPE:FACTOR fills in besides factor (HF's llama3 defaults of Llama 3.1)
_SHORT_DEFAULTS = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}


def rope_json(text: str) -> dict:
    """A `--rope-scaling` JSON object (HF's rope_parameters) -> that dict; one-line errors."""
    import json

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise SubLLMError(f"--rope-scaling must be a JSON object, got {text!r} ({e})") from None
    if not isinstance(d, dict):
        raise SubLLMError(f"--rope-scaling must be a JSON object, got {text!r}")
    return d


def parse_rope_override(text: str, window: int) -> dict:
    """`--rope-scaling` of `subllm eval` / `generate`: "yarn:4" (TYPE:FACTOR), "default" (plain RoPE)
    or a JSON object of HF's rope_parameters. `original_max_position_embeddings` defaults to
    `window`, the length the checkpoint was trained at (not max_seq_len, check_rope_scaling's
    default). Returns the dict to put in ModelConfig.rope_scaling ({"rope_type": "default"} = plain)."""
    text = text.strip()
    if text.startswith("{"):
        d = rope_json(text)
    else:
        kind, _, factor = text.partition(":")
        if kind not in ROPE_TYPES or (kind == "default") != (factor == ""):
            kinds = ", ".join(t for t in ROPE_TYPES if t != "default")
            raise SubLLMError(
                f"--rope-scaling takes TYPE:FACTOR (TYPE one of {kinds}), 'default' or a JSON object; "
                f"got {text!r}"
            )
        d = {"rope_type": kind}
        if factor:
            try:
                d["factor"] = float(factor)
            except ValueError:
                raise SubLLMError(f"--rope-scaling {text!r}: the factor must be a number") from None
        d.update(_SHORT_DEFAULTS.get(kind, {}))
    d.setdefault("rope_type", d.pop("type", "default"))
    if d["rope_type"] not in ("default", "linear"):
        d.setdefault("original_max_position_embeddings", int(window))
    return d


def with_rope_scaling(config, scaling: dict):
    """`config` (a ModelConfig) with `scaling` (parse_rope_override's dict) as its RoPE scaling,
    checked; {"rope_type": "default"} gives plain RoPE."""
    plain = scaling.get("rope_type") == "default" and set(scaling) == {"rope_type"}
    return config.replace(rope_scaling=None if plain else scaling)


def to_hf_rope_parameters(scaling: dict | None, rope_theta: float, max_seq_len: int) -> tuple[dict, int]:
    """(HF `rope_parameters`, HF `max_position_embeddings`) for an exported Llama: HF's "dynamic"
    reads its original length from max_position_embeddings, the other types from the dict."""
    params = {"rope_type": "default"} if scaling is None else dict(scaling)
    params["rope_theta"] = float(rope_theta)
    max_pos = max_seq_len
    if params["rope_type"] == "dynamic":
        max_pos = params.pop("original_max_position_embeddings")
    return params, max_pos


def from_hf_rope_parameters(params: dict | None, max_position_embeddings: int) -> dict | None:
    """`rope_scaling` (None for plain RoPE) from an HF Llama config's `rope_parameters`."""
    d = {k: v for k, v in (params or {}).items() if k not in ("rope_theta",)}
    if "type" in d:
        d.setdefault("rope_type", d.pop("type"))
    kind = d.get("rope_type", "default")
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise SubLLMError(f"rope_type {kind!r} is not supported (only {', '.join(ROPE_TYPES)})")
    if kind != "linear":
        d.setdefault("original_max_position_embeddings", max_position_embeddings)
    return d


__all__ = ["ROPE_TYPES", "check_rope_scaling", "inv_freq", "is_dynamic", "to_hf_rope_parameters",
           "from_hf_rope_parameters", "parse_rope_override", "rope_json", "with_rope_scaling"]  # fmt: skip
