"""Weights in and out: `config.json` + `model.safetensors` (no pickle), and conversion from a
Hugging Face `LlamaForCausalLM` (docs/design.md: HF Llama is the parity oracle).

transformers is imported lazily, only by `from_hf_llama`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from subllm.config import ModelConfig
from subllm.errors import SubLLMError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model, directory) -> None:
    """Write config.json and model.safetensors into `directory` (created if needed).

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("head.weight", None)  # shared with embed.weight
    cfg = {"model_type": "subllm", "architectures": ["SubLLMForCausalLM"], **model.config.to_dict()}
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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


def load_pretrained(directory, map_location: str = "cpu"):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from subllm.model.subllm import SubLLM

    cfg = load_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise SubLLMError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise SubLLMError(f"{path} is corrupt or unreadable: {e}") from None
    model = SubLLM(cfg)
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SubLLMError(
            f"{path} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(map_location)


def from_hf_llama(hf_model, structure: str | None = None, keep_ratio=None):
    """A SubLLM with every layer copied from a transformers LlamaForCausalLM.

    Only the new S (score) and B (bypass) parameters are initialised fresh. With
    `structure=None` the result is the all-T model, whose logits equal the HF model's. RoPE scaling
    (`rope_parameters`) is carried over as `rope_scaling`; for "dynamic", whose original length is
    HF's max_position_embeddings, max_seq_len becomes max_position_embeddings * factor.
    """
    from subllm.model.rope import from_hf_rope_parameters
    from subllm.model.subllm import SubLLM

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
    model = SubLLM(cfg)
    model.load_state_dict(hf_llama_to_subllm_state(hf_model.state_dict(), n), strict=False)
    return model


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
