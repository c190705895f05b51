"""Hugging Face transformers integration: `SubLLMConfig`, `SubLLMForCausalLM`, Auto registration.

`import subllm.hf` registers model_type "subllm" with `AutoConfig` and `AutoModelForCausalLM`
(`register()` does the same and is idempotent); `import subllm` alone never imports transformers.

One checkpoint format: the directory `SubLLM.save_pretrained` writes (config.json = the
`ModelConfig` fields + model_type + architectures, model.safetensors with SubLLM's parameter names).
`SubLLMForCausalLM` holds the SubLLM's modules as its own direct children (`embed`, `layers`,
`subsamples`, `bypasses`, `norm`, `head`; base_model_prefix ""), so HF loads that directory with
no key mapping, and its `save_pretrained` writes the very same format back.

Generation: HF `generate()` drives the subllm KV cache (subllm/inference/engine.py): the first step
prefills `SubLLMCache` with the (left-padded) prompt, every later step decodes one token per row,
so tokens that an S drops skip the layers inside it (docs/method.md section 3). With
`use_cache=False` every step recomputes the full eval-mode forward. Greedy and sampling are
supported; beam search (which reorders cache rows) is not.

Training with `transformers.Trainer` (or any loop) needs no extra code: the schedules' step
(docs/method.md section 7) is counted by the model itself, one per optimizer step over its
parameters (subllm/hf/step_counter.py), and kept in the `train_step` buffer, which save_pretrained
writes and a Trainer resume restores. A loop that calls `set_step` takes over,
and a step it forgets to advance raises instead of passing silently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from subllm.config import ModelConfig
from subllm.errors import SubLLMError
from subllm.hf.step_counter import StepCounter
from subllm.model.subllm import SubLLM

MODEL_TYPE = "subllm"
_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def _declare_model_config_fields(namespace: dict) -> None:
    """Declare each `ModelConfig` field (annotation + default) in a class body's namespace, so
    `SubLLMConfig` has exactly ModelConfig's fields and defaults, never a stale copy of them."""
    annotations = namespace.setdefault("__annotations__", {})
    for f in dataclasses.fields(ModelConfig):
        annotations[f.name] = f.type
        if f.default_factory is dataclasses.MISSING:
            namespace[f.name] = f.default
        else:
            namespace[f.name] = dataclasses.field(default_factory=f.default_factory)


class SubLLMConfig(PreTrainedConfig):
    """The `ModelConfig` fields as a transformers config (HF's standard names are aliases)."""

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "tie_word_embeddings": "tie_embeddings",
    }

    _declare_model_config_fields(vars())  # every ModelConfig field, same type and default
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.to_model_config()  # validate now: clear SubLLMErrors for a bad structure etc.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A config.json written before the selection fields existed is a paper-rule model (as in
        ModelConfig.from_dict), not one with today's defaults."""
        from subllm.config import SELECTION_RECIPES

        legacy = {k: v for k, v in SELECTION_RECIPES["paper"].items() if k not in config_dict}
        return super().from_dict({**config_dict, **legacy}, **kwargs)

    @property
    def num_hidden_layers(self) -> int:
        return self.structure.count("T")

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> SubLLMConfig:
        return cls(**config.to_dict(), architectures=["SubLLMForCausalLM"])


class SubLLMCache:
    """The subllm `KVCache` as generate() carries it between steps (`kv` is None before prefill)."""

    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self):
        self.kv = None
        self.steps = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.kv is None else int(self.kv.lengths(0).max())


class SubLLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A `SubLLM` behind the transformers `PreTrainedModel` / `GenerationMixin` interface.

    The SubLLM's modules are registered here as direct children (same parameter names, same
    objects); `self.subllm` is that SubLLM (kept out of the module tree) and does the computation.
    """

    config_class = SubLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"head.weight": "embed.weight"}  # used only when tie_embeddings is set
    _keys_to_ignore_on_load_missing = [r"^train_step$"]  # folders saved before the step was kept
    _supports_sdpa = True

    def __init__(self, config: SubLLMConfig):
        super().__init__(config)
        core = SubLLM(config.to_model_config())
        for name, child in core.named_children():
            self.add_module(name, child)
        self.__dict__["subllm"] = core  # not a submodule: its children are already ours
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))  # optimizer steps so far
        self.steps = StepCounter()
        self.register_load_state_dict_post_hook(_reread_step)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, after checking a local folder's weights against their recorded
        sha256 (a damaged copy is a SubLLMError, not silently different weights)."""
        from subllm.model.io import verify_weights

        if Path(str(pretrained_model_name_or_path)).is_dir():
            verify_weights(pretrained_model_name_or_path)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _materialize_core_buffers(model)
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own cache, created in prepare_inputs_for_generation

    @classmethod
    def from_subllm(cls, model: SubLLM) -> SubLLMForCausalLM:
        """Wrap an existing SubLLM: the result shares its modules and parameters (no copy)."""
        hf = cls(SubLLMConfig.from_model_config(model.config))
        for name, child in model.named_children():
            hf.add_module(name, child)
        hf.__dict__["subllm"] = model
        return hf.train(model.training)

    def _init_weights(self, module):
        if module is self:
            self.train_step.zero_()
            return
        from subllm.model.subllm import init_module

        init_module(module, self.config)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = self.subllm.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = self.subllm.head = value

    def set_step(self, step: int) -> None:
        """Explicit mode: the caller sets the step before every optimizer step's forwards (a
        forgotten update raises at the next training forward)."""
        self.subllm.set_step(step)
        self.steps.attach(self, _store_step)
        self.steps.set(step)
        self.train_step.fill_(step)

    def _training_step(self) -> int:
        """The step for this training forward: optimizer steps counted since the `train_step`
        buffer was read (a restored count after a resume), or the explicit one."""
        self.steps.attach(self, _store_step)
        if self.steps.base is None:
            self.steps.reset(int(self.train_step))  # one host read per loaded state
        return self.steps.step()

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: SubLLMCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        position_ids: Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Without `cache`: the full SubLLM forward, logits (B, T, V); `position_ids` (B, T) as in
        HF (default: counting real tokens). With a `SubLLMCache` (generation): prefill on the first
        call, then one token per row; logits (B, 1, V) at each row's last token (the prompt must be
        left-padded; positions count each row's real tokens)."""
        if input_ids is None:
            raise SubLLMError("SubLLMForCausalLM needs input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        self.subllm.training = self.training
        if self.training and torch.is_grad_enabled() and cache is None:
            self.subllm.set_step(self._training_step())
        if cache is None:
            out = self.subllm(
                input_ids, attention_mask=attention_mask, labels=labels, position_ids=position_ids
            )
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        from subllm.inference.engine import decode_step, new_cache, prefill

        if labels is not None:
            raise SubLLMError("labels are not supported together with a generation cache")
        if cache.kv is None:
            cache.kv = new_cache(self.subllm, input_ids.shape[0], input_ids.device)
            logits = prefill(self.subllm, input_ids, attention_mask, cache.kv)
        else:
            if input_ids.shape[1] != 1:
                raise SubLLMError("after the prefill, a SubLLMCache takes exactly one new token per row")
            logits = decode_step(self.subllm, cache.kv, input_ids[:, 0])
        cache.steps += 1
        return CausalLMOutputWithPast(logits=logits[:, None], cache=cache)

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, attention_mask=None, use_cache=True, **kwargs
    ):
        if not use_cache:  # recompute the whole (growing) sequence every step
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if cache is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": SubLLMCache()}
        return {"input_ids": input_ids[:, -1:], "cache": cache}

    # ---- one checkpoint format -----------------------------------------------------------------
    def to_subllm(self) -> SubLLM:
        """The SubLLM that computes this model (shares the parameters)."""
        self.subllm.training = self.training
        return self.subllm

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """Write the subllm checkpoint format (config.json + model.safetensors), nothing else.
        `safe_serialization` / `max_shard_size` are accepted and ignored (always one safetensors
        file); other HF options (push_to_hub, a custom state_dict, ...) are refused."""
        ignored = {"safe_serialization", "max_shard_size"}
        unsupported = sorted(k for k, v in kwargs.items() if k not in ignored and v not in (None, False))
        if unsupported:
            raise SubLLMError(f"SubLLMForCausalLM.save_pretrained: unsupported option(s) {unsupported}")
        if not is_main_process:
            return
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        from subllm.model.io import save_pretrained

        save_pretrained(self.to_subllm(), save_directory, extra_state={"train_step": self.train_step})


def _materialize_core_buffers(model: SubLLMForCausalLM) -> None:
    """transformers builds the model on the meta device and then loads what it knows of: the core
    SubLLM's own non-persistent buffer `step_tensor` (not a buffer of the HF module) stays on meta,
    and the first training forward would fail on it. Recreate it on the weights' device."""
    core = model.subllm
    if core.step_tensor.is_meta:
        dev = model.train_step.device
        core.register_buffer("step_tensor", torch.zeros((), dtype=torch.long, device=dev), persistent=False)
        if core.step is not None:
            core.step_tensor.fill_(core.step)


def _store_step(model: SubLLMForCausalLM, step: int) -> None:
    model.train_step.fill_(step)  # optimizer steps so far: what a checkpoint of this moment resumes from


def _reread_step(model: SubLLMForCausalLM, incompatible_keys) -> None:
    model.steps.base = None  # new weights (e.g. a Trainer resume): read train_step at the next forward
    model.steps.explicit = False


_registered = False


def register() -> None:
    """Register model_type "subllm" with AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        AutoConfig.register(MODEL_TYPE, SubLLMConfig)
    except ValueError:  # already registered (e.g. by a re-imported copy of this module)
        pass
    try:
        AutoModelForCausalLM.register(SubLLMConfig, SubLLMForCausalLM)
    except ValueError:
        pass
    _registered = True


register()

__all__ = ["SubLLMConfig", "SubLLMForCausalLM", "SubLLMCache", "register", "MODEL_TYPE"]
