"""`subllm convert`: Hugging Face Llama checkpoints <-> SUBLLM checkpoints.

    subllm convert --from-hf-llama HF_DIR [--structure S] [--keep-ratio R] --out DIR
    subllm convert --to-hf-llama SUBLLM_DIR --out HF_DIR
    subllm convert --from-official CKPT --config JSON --out DIR
    subllm convert --to-official SUBLLM_DIR --out DIR

`--from-official` / `--to-official`: the authors' released format (XiaoMi/subllm `SubllmModel`
state dict + `SubllmConfig` JSON; subllm/hf/official.py, docs/method.md section 11).

`--from-hf-llama` copies every Llama layer into a SubLLM (docs/method.md section 1): with
`--structure` only the new S (score) and B (bypass) parameters are initialised fresh, which is
the starting point for continued training; without it the result is the all-T model whose
logits equal the Llama's. `--to-hf-llama` is the inverse for an all-T SubLLM; a structure with
brackets has no Llama equivalent (token dropping, upsampling and bypass have no counterpart in
LlamaForCausalLM). Tokenizer files in the source directory are copied alongside. transformers
is imported lazily.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from subllm.data.tokenizer import TOKENIZER_FILES
from subllm.errors import SubLLMError


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy whichever tokenizer files `src` holds into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ---- HF Llama -> SubLLM ---------------------------------------------------------------------------
def load_hf_llama(directory):
    """A LlamaForCausalLM from a local HF directory, in float32, eval mode (never the hub)."""
    from transformers import AutoConfig, LlamaForCausalLM

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise SubLLMError(f"{d} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise SubLLMError(f"cannot read the config of {d}: {e}") from None
    if cfg.model_type != "llama":
        raise SubLLMError(f"{d} holds a {cfg.model_type!r} model; --from-hf-llama needs model_type 'llama'")
    try:
        model = LlamaForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise SubLLMError(f"cannot load the Llama weights of {d}: {e}") from None
    return model.eval()


def check_keep_ratio(structure: str | None, keep_ratio) -> None:
    """Fail before any loading: a keep ratio without a structure has nothing to apply to."""
    if structure is None and keep_ratio is not None:
        raise SubLLMError("--keep-ratio needs --structure (the all-T model has no subsampling module)")


def subllm_from_llama(hf, structure: str | None = None, keep_ratio=None, rope_scaling=None, max_seq_len=None):
    """A SubLLM (eval mode) holding every layer of the LlamaForCausalLM `hf`; S and B modules of
    `structure` start as the identity (config.identity_start). `rope_scaling` (an HF
    rope_parameters dict; {"rope_type": "default"} = plain) and `max_seq_len` replace what the
    Llama's config says (extending its context, subllm/model/rope.py)."""
    from subllm.model.subllm import SubLLM

    check_keep_ratio(structure, keep_ratio)
    model = SubLLM.from_hf_llama(hf, structure=structure, keep_ratio=keep_ratio).eval()
    if rope_scaling is not None or max_seq_len is not None:
        changes = {} if max_seq_len is None else {"max_seq_len": max_seq_len}
        if rope_scaling is not None:
            changes["rope_scaling"] = None if rope_scaling.get("rope_type") == "default" else rope_scaling
        model.config = model.config.replace(**changes)  # RoPE has no parameters: the weights stay
    return model


def from_hf_llama_dir(
    src, out, structure: str | None = None, keep_ratio=None, rope_scaling=None, max_seq_len=None
):
    """Convert the HF Llama directory `src` into a SubLLM checkpoint in `out` (tokenizer files
    copied alongside); returns the SubLLM. The options are `subllm_from_llama`'s."""
    check_keep_ratio(structure, keep_ratio)
    model = subllm_from_llama(load_hf_llama(src), structure, keep_ratio, rope_scaling, max_seq_len)
    model.save_pretrained(out)
    copy_tokenizer_files(src, out)
    return model


# ---- SubLLM -> HF Llama ---------------------------------------------------------------------------
def check_all_t(structure: str) -> None:
    if "(" in structure or ")" in structure:
        raise SubLLMError(
            f"structure {structure!r} has subsampling modules: a LlamaForCausalLM has no counterpart for "
            "S (token dropping), U (upsampling) or B (bypass), so dropping them would change the model's "
            "outputs; only an all-T SubLLM converts to a Llama"
        )


def subllm_to_hf_llama_state(state: dict, config) -> dict:
    """Our parameter names onto HF Llama's (the inverse of io.hf_llama_to_subllm_state): the fused
    q/k/v and gate/up projections are split again."""
    kv = config.n_kv_heads * config.head_dim
    out = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["head.weight"],
    }
    for i in range(config.n_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q, k, v = state[f"layers.{i}.attn.wqkv.weight"].split([config.dim, kv, kv])
        gate, up = state[f"layers.{i}.ffn.w13.weight"].split(config.ffn_dim)
        out.update(
            {
                a + "q_proj.weight": q,
                a + "k_proj.weight": k,
                a + "v_proj.weight": v,
                a + "o_proj.weight": state[f"layers.{i}.attn.wo.weight"],
                m + "gate_proj.weight": gate,
                m + "up_proj.weight": up,
                m + "down_proj.weight": state[f"layers.{i}.ffn.w2.weight"],
                p + "input_layernorm.weight": state[f"layers.{i}.attn_norm.weight"],
                p + "post_attention_layernorm.weight": state[f"layers.{i}.ffn_norm.weight"],
            }
        )
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_llama(model):
    """An all-T SubLLM as a transformers LlamaForCausalLM with the same weights (and logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from subllm.model.rope import to_hf_rope_parameters

    c = model.config
    check_all_t(c.structure)
    rope_parameters, max_position_embeddings = to_hf_rope_parameters(
        c.rope_scaling, c.rope_theta, c.max_seq_len
    )
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.dim,
        intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=c.norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=c.tie_embeddings,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    hf = LlamaForCausalLM(hf_cfg)
    state = subllm_to_hf_llama_state(model.state_dict(), c)
    if c.tie_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a bug, not a user error
        raise RuntimeError(f"Llama export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


def to_hf_llama_dir(src, out):
    """Convert the all-T SubLLM checkpoint `src` into an HF Llama directory `out`; returns the Llama."""
    from subllm.model.io import load_config
    from subllm.model.subllm import SubLLM

    check_all_t(load_config(src).structure)  # fail before loading the weights
    hf = to_hf_llama(SubLLM.from_pretrained(src))
    Path(out).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    copy_tokenizer_files(src, out)
    return hf


# ---- CLI ------------------------------------------------------------------------------------------


__all__ = [
    "from_hf_llama_dir",
    "subllm_from_llama",
    "check_keep_ratio",
    "to_hf_llama_dir",
    "to_hf_llama",
    "subllm_to_hf_llama_state",
    "load_hf_llama",
    "copy_tokenizer_files",
    "check_all_t",
]
