"""Weights in and out: `config.json` + `model.safetensors` (no pickle), and conversion from a
Hugging Face `LlamaForCausalLM` (docs/design.md: HF Llama is the parity oracle).

Trust: every file is written under a temporary name, fsynced, renamed, and the folder fsynced, so
a crash or power loss never leaves a torn or missing file behind a complete-looking folder; the
weights' sha256 is recorded beside them (`model.safetensors.sha256`, `sha256sum -c` format) and
checked on every load (also against a training checkpoint's checkpoint.json), so a damaged copy
is a one-line SubLLMError instead of silently different weights.

transformers is imported lazily, only by `from_hf_llama`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from subllm.config import ModelConfig, identity_start
from subllm.errors import SubLLMError
from subllm.files import atomic_write, fsync_path, sha256_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_SHA256_NAME = WEIGHTS_NAME + ".sha256"
MANIFEST_NAME = "checkpoint.json"  # a training checkpoint's manifest (subllm/trainer/checkpoint.py)
# transformers' convention for an architecture it does not ship: config.json names the classes in a
# modeling file beside the weights, which `from_pretrained(..., trust_remote_code=True)` imports.
# Ours only re-exports the installed package's classes (subllm/hf/auto.py), so the folder never holds
# a second, divergent copy of the model code.
REMOTE_CODE_NAME = "modeling_subllm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_subllm.SubLLMConfig",
    "AutoModelForCausalLM": "modeling_subllm.SubLLMForCausalLM",
}
REMOTE_CODE = '''"""Loads this subllm checkpoint with plain transformers (written by subllm save_pretrained).

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    pipeline("text-generation", model=DIR, trust_remote_code=True)

Needs the `subllm` package installed (pip install subllm, or from its repository); the classes
below are its own, so this folder holds no copy of the model code.
"""

from subllm.hf import SubLLMConfig, SubLLMForCausalLM

__all__ = ["SubLLMConfig", "SubLLMForCausalLM"]
'''


# tensors a checkpoint may carry beside the model's own (the HF wrapper's optimizer-step count)
EXTRA_STATE_KEYS = ("train_step",)


def save_pretrained(model, directory, extra_state: dict | None = None) -> None:
    """Write config.json and model.safetensors into `directory` (created if needed); `extra_state`:
    tensors stored beside the model's (EXTRA_STATE_KEYS).

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("head.weight", None)  # shared with embed.weight
    for k, v in (extra_state or {}).items():
        assert k in EXTRA_STATE_KEYS, k
        state[k] = v.detach().contiguous().cpu()
    cfg = {
        "model_type": "subllm",
        "architectures": ["SubLLMForCausalLM"],
        "auto_map": AUTO_MAP,
        **model.config.to_dict(),
    }
    atomic_write(d / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    line = f"{sha256_file(d / WEIGHTS_NAME)}  {WEIGHTS_NAME}\n"
    atomic_write(d / WEIGHTS_SHA256_NAME, lambda p: p.write_text(line))
    atomic_write(d / REMOTE_CODE_NAME, lambda p: p.write_text(REMOTE_CODE))
    atomic_write(d / CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    fsync_path(d)  # the renames themselves


def recorded_sha256(directory) -> tuple[str, Path] | None:
    """The sha256 the folder records for its weights, and the file that records it (the sidecar
    written by save_pretrained, else a training checkpoint's manifest); None if neither exists."""
    d = Path(directory)
    side, manifest = d / WEIGHTS_SHA256_NAME, d / MANIFEST_NAME
    if side.is_file():
        digest = side.read_text().split()
        if not digest or len(digest[0]) != 64:
            raise SubLLMError(f"{side} is damaged: no sha256 in it")
        return digest[0].lower(), side
    if manifest.is_file():
        entry = (read_json(manifest).get("files") or {}).get(WEIGHTS_NAME) or {}
        if "sha256" in entry:
            return entry["sha256"], manifest
    return None


def verify_weights(directory) -> bool:
    """Check model.safetensors against its recorded sha256 (SubLLMError on a mismatch); False when
    the folder records none (written before sha256s were kept, or by another tool)."""
    rec = recorded_sha256(directory)
    if rec is None:
        return False
    want, source = rec
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise SubLLMError(f"no {WEIGHTS_NAME} in {directory}")
    got = sha256_file(path)
    if got != want:
        raise SubLLMError(
            f"{path} is corrupt: its sha256 {got[:16]}... differs from the {want[:16]}... recorded in "
            f"{source.name} when it was saved (a damaged or truncated copy); copy or save it again"
        )
    return True


def read_json(path, label: str | None = None):
    """The parsed JSON file `path`; text that is not UTF-8 JSON is a one-line SubLLMError
    "`label` (default: the path) is not valid JSON: <where and why>"."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubLLMError(f"{label or path} is not valid JSON: {e}") from None


def load_config(directory) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise SubLLMError(f"no {CONFIG_NAME} in {directory} (not a subllm checkpoint directory?)")
    return ModelConfig.from_dict(read_json(path))


def read_pretrained(directory, map_location: str = "cpu", verify: bool = True) -> tuple[ModelConfig, dict]:
    """The config and weights saved in a model folder or a run folder (`resolve_checkpoint`);
    `verify`: check the weights' recorded sha256 first. `SubLLM.from_pretrained` builds the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_checkpoint(directory)
    cfg = load_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise SubLLMError(f"no {WEIGHTS_NAME} in {directory}")
    if verify:
        verify_weights(directory)
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise SubLLMError(f"{path} is corrupt or unreadable: {e}") from None
    for k in EXTRA_STATE_KEYS:
        state.pop(k, None)
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    return cfg, state


def load_state_checked(model, state: dict, source) -> None:
    """`model.load_state_dict(state)`, a one-line error naming `source` if the keys differ."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SubLLMError(
            f"{source} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def hf_llama_config_state(
    hf_model, structure: str | None = None, keep_ratio=None, start: str = "identity"
) -> tuple[ModelConfig, dict]:
    """The config and weights of a SubLLM with every layer copied from a transformers
    LlamaForCausalLM (`SubLLM.from_hf_llama` builds it).

    Only the new S (score) and B (bypass) parameters are initialised fresh: with `start` "identity"
    so that at keep ratio 1.0 the model equals the Llama (config.identity_start), with "fresh" as a
    model trained from scratch would start (bypass 0.5, no score bias). With
    `structure=None` the result is the all-T model, whose logits equal the HF model's. RoPE scaling
    (`rope_parameters`) is carried over as `rope_scaling`; for "dynamic", whose original length is
    HF's max_position_embeddings, max_seq_len becomes max_position_embeddings * factor.
    """
    from subllm.model.rope import from_hf_rope_parameters

    c = hf_model.config
    if getattr(c, "model_type", None) != "llama":
        raise SubLLMError(f"expected a Llama model, got model_type {getattr(c, 'model_type', None)!r}")
    rope = getattr(c, "rope_parameters", None) or {}
    rope_scaling = from_hf_rope_parameters(rope, c.max_position_embeddings)
    max_seq_len = c.max_position_embeddings
    if rope_scaling is not None and rope_scaling["rope_type"] == "dynamic":
        # HF's dynamic scaling grows past max_position_embeddings (its original length); here
        # max_seq_len is a hard limit, so allow the length the factor is meant for
        max_seq_len = int(c.max_position_embeddings * rope_scaling["factor"])
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise SubLLMError("Llama models with attention or MLP biases are not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise SubLLMError(f"hidden_act {c.hidden_act!r} is not supported (only 'silu')")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise SubLLMError("Llama configs with head_dim * n_heads != hidden_size are not supported")
    n = c.num_hidden_layers
    if structure is None:
        structure, keep_ratio = "T" * n, 1.0
    elif structure.count("T") != n:
        raise SubLLMError(f"structure {structure!r} has {structure.count('T')} layers, the model has {n}")
    cfg = ModelConfig(
        vocab_size=c.vocab_size,
        dim=c.hidden_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        ffn_dim=c.intermediate_size,
        structure=structure,
        keep_ratio=0.64 if keep_ratio is None else keep_ratio,
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        max_seq_len=max_seq_len,
        norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(c.tie_word_embeddings),
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
        bos_token_id=c.bos_token_id if c.bos_token_id is not None else 1,
        eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else 2,
    )
    if start == "identity":
        cfg = identity_start(cfg)
    elif start != "fresh":
        raise SubLLMError(f"start must be 'identity' or 'fresh', got {start!r}")
    return cfg, hf_llama_to_subllm_state(hf_model.state_dict(), n)


def hf_llama_to_subllm_state(hf: dict, n_layers: int) -> dict:
    """Map HF Llama parameter names onto ours (q/k/v and gate/up are fused here)."""
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["head.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    for i in range(n_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[f"layers.{i}.attn.wqkv.weight"] = torch.cat(
            [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]]
        )
        out[f"layers.{i}.attn.wo.weight"] = hf[a + "o_proj.weight"]
        out[f"layers.{i}.ffn.w13.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        out[f"layers.{i}.ffn.w2.weight"] = hf[m + "down_proj.weight"]
        out[f"layers.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out


def resolve_checkpoint(path) -> Path:
    """A model folder (config.json + model.safetensors), or a run folder whose
    checkpoints/latest is one."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if (latest / "config.json").is_file():
        return latest.resolve()
    raise SubLLMError(f"{p} is not a subllm checkpoint (no config.json, no checkpoints/latest)")
