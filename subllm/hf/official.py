"""The authors' released checkpoint format (XiaoMi/subllm `SubllmModel`) <-> subllm.

docs/method.md section 11. Their checkpoint is a pickled state dict of `SubllmModel` (sometimes
wrapped as `{"model": sd}`) plus a JSON of `SubllmConfig` fields. Differences from our layout:

- separate q/k/v projections and SwiGLU `w12` (gate rows first, then up) / `w3` (down), where we
  fuse q/k/v into `wqkv` and gate/up into `w13` (same row order);
- a `position.inv_freq` RoPE buffer in every layer: checked against base 10000 and dropped (we
  compute RoPE from `rope_theta`); written back on export;
- bypasses numbered in the order of the `)` characters, ours in the order of `(` (the pair they
  close): for nested structures they are re-indexed (`bypass_order`);
- RMSNorm eps 1e-5 everywhere (their norm factory's default), not a config field;
- `SubllmConfig` defaults `qk_bias=True` and `tie_weights=True`: a field missing from the JSON
  takes those defaults, as their code would. q/k biases have no counterpart here and are refused.

Converted models follow the paper's selection rule (SELECTION_RECIPES["paper"]: score on raw x,
keep iff s > 0), which is what their inference code computes.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

from subllm.config import ModelConfig
from subllm.errors import SubLLMError

OFFICIAL_EPS = 1e-5
OFFICIAL_THETA = 10000.0
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
# SubllmConfig's constructor defaults, for fields a JSON leaves out
OFFICIAL_DEFAULTS = {
    "num_embeddings": 32000,
    "decoder_embed_dim": 2048,
    "decoder_ffn_embed_dim": 2048 * 4,
    "decoder_layers": 24,
    "decoder_attention_heads": 32,
    "norm_name": "rmsnorm",
    "mlp_name": "swiglu",
    "qk_bias": True,
    "tokens_per_sample": 2048,
    "padding_idx": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "downsampling_factor_denominator": "0.5",
    "tie_weights": True,
    "structure": None,
}


def bypass_order(structure: str) -> list[int]:
    """For each of our bypasses (numbered by '('), the index of the authors' bypass (numbered by ')')."""
    ours_of_theirs, stack, n_open = [], [], 0
    for ch in structure:
        if ch == "(":
            stack.append(n_open)
            n_open += 1
        elif ch == ")":
            ours_of_theirs.append(stack.pop())
    theirs_of_ours = [0] * len(ours_of_theirs)
    for theirs, ours in enumerate(ours_of_theirs):
        theirs_of_ours[ours] = theirs
    return theirs_of_ours


# ---- official config <-> ModelConfig ----------------------------------------------------------
def config_from_official(cfg: dict) -> ModelConfig:
    """A ModelConfig (paper selection rule, eps 1e-5, theta 10000) from a SubllmConfig dict."""
    c = {**OFFICIAL_DEFAULTS, **cfg}
    if c["qk_bias"]:
        raise SubLLMError(
            "the official config has qk_bias=true (also SubllmConfig's default when the field is "
            "missing): q/k projection biases have no counterpart in subllm; only qk_bias=false "
            "checkpoints (the released 1.3B configs) convert"
        )
    if str(c["norm_name"]).lower() != "rmsnorm" or str(c["mlp_name"]).lower() != "swiglu":
        raise SubLLMError(
            f"norm_name {c['norm_name']!r} / mlp_name {c['mlp_name']!r}: only rmsnorm + swiglu convert"
        )
    if not isinstance(c["structure"], str):
        raise SubLLMError("the official config has no 'structure' string")
    if c["structure"].count("T") != c["decoder_layers"]:
        raise SubLLMError(
            f"structure {c['structure']!r} has {c['structure'].count('T')} layers but "
            f"decoder_layers is {c['decoder_layers']}"
        )
    if "hidden_size" in cfg and cfg["hidden_size"] != c["decoder_embed_dim"]:
        raise SubLLMError(f"hidden_size {cfg['hidden_size']} != decoder_embed_dim {c['decoder_embed_dim']}")
    denom = c["downsampling_factor_denominator"]
    try:
        keep = float(ast.literal_eval(denom) if isinstance(denom, str) else denom)
    except (ValueError, TypeError, SyntaxError):
        raise SubLLMError(f"downsampling_factor_denominator must be one number, got {denom!r}") from None
    return ModelConfig(
        vocab_size=c["num_embeddings"],
        dim=c["decoder_embed_dim"],
        n_heads=c["decoder_attention_heads"],
        ffn_dim=c["decoder_ffn_embed_dim"],
        structure=c["structure"],
        keep_ratio=keep,
        rope_theta=OFFICIAL_THETA,
        max_seq_len=c["tokens_per_sample"],
        norm_eps=OFFICIAL_EPS,
        tie_embeddings=bool(c["tie_weights"]),
        pad_token_id=c["padding_idx"],
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
    ).with_selection("paper")


def config_to_official(config: ModelConfig) -> dict:
    """The SubllmConfig fields of `config`; refuses what the authors' model cannot express."""
    problems = []
    if config.n_kv_heads != config.n_heads:
        problems.append(
            f"grouped-query attention (n_kv_heads {config.n_kv_heads} != n_heads {config.n_heads})"
        )
    if config.rope_theta != OFFICIAL_THETA:
        problems.append(f"rope_theta {config.rope_theta:g} (theirs is fixed at 10000)")
    if config.norm_eps != OFFICIAL_EPS:
        problems.append(f"norm_eps {config.norm_eps:g} (theirs is fixed at 1e-5)")
    if len(set(config.keep_ratios)) > 1:
        problems.append(f"per-S keep ratios {config.keep_ratios} (theirs take one)")
    if config.score_norm or config.threshold != "zero" or not config.bypass:
        problems.append(
            "a selection rule other than the paper's (score_norm, calibrated threshold or no bypass)"
        )
    if "M" in config.structure:
        problems.append("Mixture-of-Depths 'M' layers (theirs has none)")
    if config.structure.count("(") == 0:
        problems.append("no subsampling module (their model needs at least one '(')")
    if problems:
        raise SubLLMError("cannot export to the official format: " + "; ".join(problems))
    keep = config.keep_ratios[0]
    if keep >= 1.0:
        raise SubLLMError("cannot export keep ratio 1.0 (their downsampling factor must exceed 1)")
    return {
        "num_embeddings": config.vocab_size,
        "decoder_embed_dim": config.dim,
        "decoder_ffn_embed_dim": config.ffn_dim,
        "hidden_size": config.dim,
        "decoder_layers": config.n_layers,
        "decoder_attention_heads": config.n_heads,
        "norm_name": "rmsnorm",
        "mlp_name": "swiglu",
        "qk_bias": False,
        "use_fused": False,
        "attn_type": "vanilla",
        "tokens_per_sample": config.max_seq_len,
        "n_positions": config.max_seq_len,
        "padding_idx": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "scale_token_embedding": False,
        "downsampling_factor_denominator": repr(float(keep)),
        "tie_weights": bool(config.tie_embeddings),
        "structure": config.structure,
    }


def official_inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / (OFFICIAL_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim))


# ---- state dicts ----------------------------------------------------------------------------------
def state_from_official(sd: dict, config: ModelConfig) -> dict:
    """Their state dict -> ours. Every key must be used; q/k biases and a foreign inv_freq are errors."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    used: set[str] = set()

    def take(key):
        if key not in sd:
            raise SubLLMError(f"the official checkpoint lacks {key!r} (structure {config.structure!r})")
        used.add(key)
        return sd[key]

    biases = sorted(k for k in sd if k.endswith(".bias"))
    if biases:
        raise SubLLMError(
            f"the official checkpoint has biases ({biases[0]}, ...): only qk_bias=false converts"
        )
    out = {
        "embed.weight": take("decoder.embed_tokens.weight"),
        "norm.weight": take("decoder.layer_norm.weight"),
    }
    head = sd.get("decoder.output_projection.weight")
    if config.tie_embeddings:
        if head is not None and not torch.equal(head, out["embed.weight"]):
            raise SubLLMError("tie_weights=true but output_projection differs from embed_tokens")
        used.add("decoder.output_projection.weight")
        out["head.weight"] = out["embed.weight"]
    else:
        out["head.weight"] = take("decoder.output_projection.weight")
    inv = official_inv_freq(config.head_dim)
    for i in range(config.n_layers):
        p = f"decoder.layers.{i}."
        a = p + "self_attn."
        found = sd.get(a + "position.inv_freq")
        if found is not None:
            used.add(a + "position.inv_freq")
            if found.shape != inv.shape or not torch.allclose(found.float(), inv, rtol=1e-5, atol=0):
                raise SubLLMError(
                    f"{a}position.inv_freq does not match RoPE base {OFFICIAL_THETA:g} over head dim "
                    f"{config.head_dim}: this checkpoint uses other positions and cannot convert"
                )
        out[f"layers.{i}.attn.wqkv.weight"] = torch.cat(
            [take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")]
        )
        out[f"layers.{i}.attn.wo.weight"] = take(a + "out_proj.weight")
        out[f"layers.{i}.ffn.w13.weight"] = take(p + "feedforward.swiglu.w12.weight")
        out[f"layers.{i}.ffn.w2.weight"] = take(p + "feedforward.swiglu.w3.weight")
        out[f"layers.{i}.attn_norm.weight"] = take(p + "self_attn_layer_norm.weight")
        out[f"layers.{i}.ffn_norm.weight"] = take(p + "final_layer_norm.weight")
    for ours, theirs in enumerate(bypass_order(config.structure)):
        out[f"subsamples.{ours}.score.weight"] = take(f"decoder.downsamplers.{ours}.to_scores.weight")
        out[f"bypasses.{ours}.scale"] = take(f"decoder.bypasses.{theirs}.bypass_scale")
    unused = sorted(set(sd) - used)
    if unused:
        raise SubLLMError(f"the official checkpoint has keys this converter does not know: {unused[:5]}")
    return {k: v.float().contiguous() for k, v in out.items()}


def state_to_official(state: dict, config: ModelConfig) -> dict:
    """Our state dict -> theirs (what `SubllmModel.load_state_dict` accepts strictly)."""
    kv = config.n_kv_heads * config.head_dim
    out = {
        "decoder.embed_tokens.weight": state["embed.weight"],
        "decoder.layer_norm.weight": state["norm.weight"],
        "decoder.output_projection.weight": state["embed.weight" if config.tie_embeddings else "head.weight"],
    }
    inv = official_inv_freq(config.head_dim)
    for i in range(config.n_layers):
        p = f"decoder.layers.{i}."
        a = p + "self_attn."
        q, k, v = state[f"layers.{i}.attn.wqkv.weight"].split([config.dim, kv, kv])
        out.update(
            {
                a + "q_proj.weight": q,
                a + "k_proj.weight": k,
                a + "v_proj.weight": v,
                a + "out_proj.weight": state[f"layers.{i}.attn.wo.weight"],
                a + "position.inv_freq": inv.clone(),
                p + "feedforward.swiglu.w12.weight": state[f"layers.{i}.ffn.w13.weight"],
                p + "feedforward.swiglu.w3.weight": state[f"layers.{i}.ffn.w2.weight"],
                p + "self_attn_layer_norm.weight": state[f"layers.{i}.attn_norm.weight"],
                p + "final_layer_norm.weight": state[f"layers.{i}.ffn_norm.weight"],
            }
        )
    for ours, theirs in enumerate(bypass_order(config.structure)):
        out[f"decoder.downsamplers.{ours}.to_scores.weight"] = state[f"subsamples.{ours}.score.weight"]
        out[f"decoder.bypasses.{theirs}.bypass_scale"] = state[f"bypasses.{ours}.scale"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# ---- files ----------------------------------------------------------------------------------------
def load_official_state(path) -> dict:
    """torch.load(weights_only=True) of their checkpoint, unwrapped from {"model": sd} if needed."""
    path = Path(path)
    if not path.is_file():
        raise SubLLMError(f"official checkpoint {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise SubLLMError(
            f"cannot read {path} as a tensors-only checkpoint ({type(e).__name__}: {e})"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SubLLMError(f"{path} is not a state dict (nor {{'model': state_dict}})")
    return sd


def from_official(ckpt, config_json):
    """A SubLLM (eval mode) from the authors' checkpoint file and config JSON."""
    from subllm.model.io import read_json
    from subllm.model.subllm import SubLLM

    if not Path(config_json).is_file():
        raise SubLLMError(f"official config {config_json} does not exist")
    cfg = read_json(config_json)
    if not isinstance(cfg, dict):
        raise SubLLMError(f"{config_json} is not a JSON object of SubllmConfig fields")
    config = config_from_official(cfg)
    state = state_from_official(load_official_state(ckpt), config)
    model = SubLLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug of this converter, not a user error
        raise RuntimeError(f"official import: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def to_official(model, out) -> tuple[Path, Path]:
    """Write `out`/model.pt (a plain state dict) and `out`/config.json in the authors' format."""
    out = Path(out)
    cfg = config_to_official(model.config)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state_to_official(model.state_dict(), model.config), out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out / WEIGHTS_FILE, out / CONFIG_FILE


__all__ = [
    "bypass_order",
    "config_from_official",
    "config_to_official",
    "state_from_official",
    "state_to_official",
    "load_official_state",
    "from_official",
    "to_official",
]
