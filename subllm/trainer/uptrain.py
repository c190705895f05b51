"""Uptraining: `subllm train --init-from DIR` starts a run from a trained LLaMA instead of random
weights (issue 12, item 3; docs/method.md section 1: an all-`T` SUBLLM is a LLaMA).

DIR is one of our model or run folders (config.json with model_type "subllm" + model.safetensors,
all-`T`) or a Hugging Face Llama folder (model_type "llama"). What comes from where:

- the architecture (`ARCH_FIELDS`: dimensions, heads, vocabulary, RoPE, norm eps, tied embeddings,
  special token ids) and the tokenizer come from DIR; `--set` may not change them;
- `--structure` / `--keep-ratio` decide which S (subsample) and B (bypass) modules are added, and
  which layers become Mixture-of-Depths `M` layers (a router each; subllm/model/mod.py) (default:
  DIR's own all-`T` structure, i.e. the LLaMA simply continues training); the structure must have as
  many layers (`T` or `M`) as DIR has;
- the selection recipe and schedules come from `--preset` / `--selection` / `--set` as in any run.

Every parameter of DIR is copied exactly (the layers keep their index: `layers.i` is the i-th `T`
of the structure); only the new S score layers (routers) and B scales keep the initialisation
`SubLLM(config)` gives them from the run's seed. `--train-only subsample,bypass` (router tuning) sets
requires_grad=False on everything else, so those parameters get no gradient and no optimizer state
and stay bit-identical. On `--resume` the weights come from the checkpoint; DIR is read again only
to rebuild (and check) the same model config.

DIR may also be a SUBLLM (fine-tuning, e.g. to extend its context, issue 11): then the run keeps
DIR's whole config (structure, keep ratios, selection recipe) and every weight, S and B included;
`--structure` must be DIR's own. For either kind `--set` may change the RoPE scaling and
`max_seq_len` (`EXTENDABLE`: they change no weight), e.g. `--set rope_scaling='{"rope_type": "yarn",
"factor": 4, "original_max_position_embeddings": 256}'` to fine-tune with YaRN at a longer window.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from subllm.config import ModelConfig, get_preset, identity_start
from subllm.errors import SubLLMError

ARCH_FIELDS = (
    "vocab_size",
    "dim",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "rope_theta",
    "rope_scaling",
    "max_seq_len",
    "norm_eps",
    "tie_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
EXTENDABLE = (
    "rope_scaling",
    "max_seq_len",
)  # architecture fields --set may change: no weight depends on them
TRAIN_ONLY = ("subsample", "bypass")  # --train-only groups -> the state-dict prefixes they free
PREFIXES = {"subsample": "subsamples.", "bypass": "bypasses."}


@dataclass
class Source:
    path: Path
    kind: str  # "subllm" (our folder) | "hf-llama"
    config: ModelConfig
    state: dict  # weights under our names (SubLLM.state_dict() of the all-T model)

    def record(self) -> dict:
        c = self.config
        return {"path": str(self.path), "kind": self.kind, "structure": c.structure, "n_layers": c.n_layers}


def load_source(directory: str | Path) -> Source:
    """The all-`T` model in `directory` (ours or a Hugging Face Llama), as a config + state dict."""
    from subllm.model.io import read_json

    d = Path(directory)
    if not d.is_dir():
        raise SubLLMError(f"--init-from {d}: no such folder")
    if not (d / "config.json").is_file():
        raise SubLLMError(
            f"--init-from {d}: no config.json (give a model or run folder with config.json + "
            "model.safetensors, or a Hugging Face Llama folder)"
        )
    model_type = (read_json(d / "config.json", f"--init-from {d}/config.json") or {}).get("model_type")
    if model_type == "subllm":
        from subllm.model.subllm import SubLLM

        if not (d / "model.safetensors").is_file():
            raise SubLLMError(f"--init-from {d}: no model.safetensors beside config.json")
        model, kind = SubLLM.from_pretrained(d), "subllm"
    elif model_type == "llama":
        from subllm.hf.llama import load_hf_llama
        from subllm.model.subllm import SubLLM

        model, kind = SubLLM.from_hf_llama(load_hf_llama(d)), "hf-llama"
    else:
        raise SubLLMError(
            f"--init-from {d}: model_type {model_type!r}; expected 'subllm' (a run or model folder) or "
            "'llama' (a Hugging Face Llama folder)"
        )
    return Source(d.resolve(), kind, model.config, model.state_dict())


def source_tokenizer(directory: str | Path) -> str:
    """DIR itself, which must hold the tokenizer the model was trained with."""
    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        raise SubLLMError(
            f"--init-from {d}: no tokenizer.json there; the tokenizer of an uptraining run comes from "
            "the model it starts from (save it beside config.json)"
        )
    return str(d)


def base_config(preset: str, source: ModelConfig) -> ModelConfig:
    """The preset's selection and schedule fields with the source's architecture and structure; a
    SUBLLM source keeps its whole config (fine-tuning)."""
    if source.n_subsamples:
        return source.replace(extra={})
    arch = {k: getattr(source, k) for k in ARCH_FIELDS}
    mc = get_preset(preset)
    keep = mc.keep_ratios[0] if mc.keep_ratios else 0.64
    # the new S and B start as the identity (config.identity_start): at keep ratio 1.0 the model is
    # its source, and --set keep_anneal_steps=N lowers the keep ratio from there without a jump
    return identity_start(mc.replace(structure=source.structure, keep_ratio=keep, **arch))


def check_overrides(overrides: dict, source: ModelConfig, directory) -> None:
    """--set may not change what the source model fixes."""
    for k, v in overrides.items():
        if k in ARCH_FIELDS and k not in EXTENDABLE and v != getattr(source, k):
            raise SubLLMError(
                f"--set {k}={v!r}: --init-from {directory} fixes {k} = {getattr(source, k)!r} "
                "(the architecture comes from the model you start from)"
            )


def check_model(mc: ModelConfig, source: ModelConfig, tokenizer_meta: dict | None, directory) -> None:
    if source.n_subsamples and mc.structure != source.structure:
        raise SubLLMError(
            f"--init-from {directory} is a SUBLLM ({source.structure!r}): fine-tuning keeps its structure, "
            f"got --structure {mc.structure!r}"
        )
    if mc.n_layers != source.n_layers:
        raise SubLLMError(
            f"--structure {mc.structure!r} has {mc.n_layers} layers (T or M), but --init-from {directory} "
            f"has {source.n_layers}: give a structure with {source.n_layers} T or M"
        )
    if tokenizer_meta and int(tokenizer_meta["vocab_size"]) > source.vocab_size:
        raise SubLLMError(
            f"the data's tokenizer has {tokenizer_meta['vocab_size']} tokens but --init-from {directory} "
            f"has a vocabulary of {source.vocab_size}: pack the data with the model's own tokenizer"
        )


def copy_weights(model, source: Source) -> list[str]:
    """Load every source parameter into `model`; returns the names left at their fresh initialisation
    (all S or B: anything else missing or unexpected is a bug, not a user error)."""
    state = dict(source.state)
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "head.weight")]
    stray = [k for k in missing if not k.startswith(tuple(PREFIXES.values()))]
    if stray or unexpected:
        raise RuntimeError(f"--init-from: missing {stray[:5]}, unexpected {unexpected[:5]}")
    return missing


def freeze(model, groups) -> int:
    """requires_grad=False on every parameter outside `groups` (TRAIN_ONLY names); returns how many
    parameters stay trainable."""
    keep = tuple(PREFIXES[g] for g in groups)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(keep))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise SubLLMError(
            f"--train-only {','.join(groups)}: structure {model.config.structure!r} has no such parameters "
            "(add subsampling modules with --structure, e.g. 'TT(TT)TT')"
        )
    return n
