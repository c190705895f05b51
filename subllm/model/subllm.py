"""SubLLM: token embeddings, the layer stack built from the parsed structure string, norm, head.

docs/method.md sections 1-7. Layers inside a bracket pair run on a SHORTER gathered tensor of the
kept tokens (never a mask over the full length); each level carries the original positions of
its tokens (RoPE, section 6), a per-row validity mask when rows keep different counts, and one
attention mask built once and shared by all of its layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from subllm.config import ModelConfig, Sub, iter_subs
from subllm.errors import SubLLMError
from subllm.model import io
from subllm.model.layers import Block, RMSNorm, rope_cos_sin
from subllm.model.mod import ModOptions, ModRouter
from subllm.model.rope import is_dynamic
from subllm.model.scaling import ScheduledFloat
from subllm.model.subsample import (
    Bypass,
    ScoreLinear,
    Selection,
    SelectOptions,
    Subsample,
    gather_tokens,
    upsample_bypass,
)


@dataclass
class Level:
    """What every layer at one nesting level shares."""

    pos: Tensor  # (B, L) original positions in the full sequence
    valid: Tensor | None  # (B, L) bool: real token / valid slot; None = all valid
    cos: Tensor  # (B, L, head_dim)
    sin: Tensor
    mask: Tensor | None  # (B, 1, L, L) bool, True = may attend; None = plain causal
    seq_len: Tensor | None = None  # (B,) full-sequence length per row (dynamic RoPE scaling only)


def attention_mask_for(valid: Tensor | None) -> Tensor | None:
    """Causal mask that also hides invalid keys. Every query may see itself, so rows of invalid
    queries (whose outputs are discarded) never become all-masked (which would give NaN)."""
    if valid is None:
        return None
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | eye


def score_init_std(config) -> float:
    """The score layers' init std: score_init_std, else 1/sqrt(dim) with score_norm (scores of unit
    scale at initialisation), else init_std like every other Linear."""
    if config.score_init_std is not None:
        return config.score_init_std
    return config.dim**-0.5 if config.score_norm else config.init_std


def init_module(m: nn.Module, config) -> None:
    """The initialisation of one module (LLaMA's: normal(0, init_std) weights, unit norms; bypass
    0.5; score layers: `score_init_std`). `config`: a ModelConfig or the HF SubLLMConfig."""
    if isinstance(m, ScoreLinear):
        nn.init.normal_(m.weight, mean=0.0, std=score_init_std(config))
        if m.bias is not None:
            nn.init.constant_(m.bias, config.score_bias)
    elif isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=config.init_std)
    elif isinstance(m, RMSNorm):
        nn.init.ones_(m.weight)
    elif isinstance(m, Bypass) and m.enabled:
        nn.init.constant_(m.scale, getattr(config, "bypass_init", 0.5))


@dataclass
class SubLLMOutput:
    logits: Tensor | None  # (B, T, V); None with return_hidden=True
    loss: Tensor | None = None  # what training minimises: lm_loss (+ select_loss when enabled)
    lm_loss: Tensor | None = None  # next-token cross-entropy alone
    select_loss: Tensor | None = None  # training: the weighted auxiliary selection loss, summed over S
    keep_fractions: Tensor = field(default_factory=lambda: torch.zeros(0))  # (n_S,) per S, structure order
    agreement: Tensor | None = None  # (n_S,) training mode: top-k vs (score > theta), per S
    selections: list[Selection | None] | None = None  # with return_selections=True
    hidden: Tensor | None = None  # (B, T, C) the final norm's output, with return_hidden=True


class SubLLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tree = config.tree
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        prob = ScheduledFloat(
            (0, config.balancer_prob_start), (config.balancer_steps, config.balancer_prob_end)
        )
        bmin = ScheduledFloat((0, config.bypass_min_start), (config.bypass_steps, config.bypass_min_end))
        opts = SelectOptions.of(config)
        mod = ModOptions(config.mod_router, config.mod_predictor_dim, config.mod_aux_loss, config.mod_weight)
        self.mod_flags = flags = config.mod_flags  # `M` routers: MoD routing, no bypass (model/mod.py)
        kw = dict(
            grad_scale=config.balancer_grad_scale,
            options=opts,
            score_norm=config.score_norm,
            score_bias=config.score_bias is not None,
            keep_first=config.keep_first,
        )
        self.subsamples = nn.ModuleList(
            ModRouter(config.dim, r, prob, mod, **kw) if m else Subsample(config.dim, r, prob, **kw)
            for r, m in zip(config.keep_ratios, flags)
        )
        self.bypasses = nn.ModuleList(
            Bypass(config.dim, bmin, config.bypass and not m, config.bypass_init) for m in flags
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._step: int | None = None
        # activation checkpointing per layer (set by the trainer, never by the model itself): each
        # Block's activations are recomputed in backward instead of saved (torch.utils.checkpoint,
        # non-reentrant); only training-mode forwards with grad enabled are affected
        self.activation_checkpointing = False
        self._has_step = False  # what forward checks: a bool that flips once (an int would recompile)
        # the step as a device tensor: what forward reads, so a compiled graph never sees a new constant
        self.register_buffer("step_tensor", torch.zeros((), dtype=torch.long), persistent=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        for m in self.modules():
            init_module(m, self.config)

    def set_step(self, step: int) -> None:
        """Feed the training step to the schedules (Balancer prob, bypass minimum)."""
        if not isinstance(step, int) or step < 0:
            raise SubLLMError(f"step must be a non-negative int, got {step!r}")
        self.step = step

    @property
    def step(self) -> int | None:
        """The training step last given to `set_step` (None before; forward reads `step_tensor`)."""
        return self._step

    @step.setter
    def step(self, step: int | None) -> None:
        self._step = step
        self._has_step = step is not None
        if step is not None:
            self.step_tensor.fill_(step)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    # ---- forward ---------------------------------------------------------------------------
    def make_level(self, pos: Tensor, valid: Tensor | None, seq_len: Tensor | None = None) -> Level:
        c = self.config
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, c.rope_scaling, seq_len)
        return Level(pos, valid, cos, sin, attention_mask_for(valid), seq_len)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_selections: bool = False,
        position_ids: Tensor | None = None,
        return_hidden: bool = False,
    ) -> SubLLMOutput:
        """input_ids (B, T); attention_mask (B, T) 1 = real, 0 = pad (left or right padding);
        labels (B, T) = the targets aligned with input_ids (shifted here), -100 ignored;
        position_ids (B, T) long (HF's convention): each token's RoPE position, kept by the token at
        every nesting level (default: 0, 1, ... counting real tokens only). With "dynamic" RoPE
        scaling a row's sequence length is its largest position (of a real token) + 1.
        return_hidden: the final norm's output instead of logits and LM loss (a caller that computes
        its own loss from the head in chunks: distillation, subllm/trainer/distill.py)."""
        if input_ids.dim() != 2:
            raise SubLLMError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise SubLLMError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        if self.training and self.config.n_subsamples and not self._has_step:
            raise SubLLMError(
                "training-mode forward before model.set_step(step): the Balancer and bypass schedules "
                "depend on the training step (docs/method.md section 7)"
            )
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise SubLLMError("attention_mask must have the same shape as input_ids")
            valid = attention_mask.bool()
            if bool(valid.all()):
                valid = None
        if position_ids is not None:
            if position_ids.shape != input_ids.shape or position_ids.dtype.is_floating_point:
                raise SubLLMError(
                    f"position_ids must be integers of the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {position_ids.dtype} {tuple(position_ids.shape)}"
                )
            pos = position_ids.long()
        elif valid is None:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
        seq_len = None
        if is_dynamic(self.config.rope_scaling):  # per row, from level 0: never a subsampled level's
            seq_len = (pos if valid is None else pos.masked_fill(~valid, 0)).amax(1) + 1
        sels: list[Selection | None] = [None] * self.config.n_subsamples
        x = self.embed(input_ids)  # (B, T, C)
        x = self._run(self.tree, x, self.make_level(pos, valid, seq_len), sels)
        hidden = self.norm(x)  # (B, T, C)
        logits = None if return_hidden else self.head(hidden)  # (B, T, V)
        loss = lm_loss = None
        if labels is not None and logits is not None:
            if valid is not None:
                labels = labels.masked_fill(~valid, -100)
            loss = lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        # S's auxiliary losses share the weight select_loss; an `M` router's comes weighted already
        aux, mod_aux = [], []
        for s, m in zip(sels, self.mod_flags):
            if s is not None and s.select_loss is not None:
                (mod_aux if m else aux).append(s.select_loss)
        select_loss = self.config.select_loss * torch.stack(aux).sum() if aux else None
        if mod_aux:
            mod_loss = torch.stack(mod_aux).sum()
            select_loss = mod_loss if select_loss is None else select_loss + mod_loss
        if loss is not None and select_loss is not None:
            loss = loss + select_loss
        return SubLLMOutput(
            logits=logits,
            loss=loss,
            lm_loss=lm_loss,
            select_loss=select_loss,
            keep_fractions=_keep_fractions(sels),
            agreement=_agreement(sels) if self.training else None,
            selections=sels if return_selections else None,
            hidden=hidden if return_hidden else None,
        )

    def _run(self, nodes: tuple, x: Tensor, level: Level, sels: list) -> Tensor:
        for node in nodes:
            if isinstance(node, Sub):
                x = self._subsample(node, x, level, sels)
            else:
                x = self._layer(node, x, level)
        return x

    def _layer(self, i: int, x: Tensor, level: Level) -> Tensor:
        block = self.layers[i]
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, level.cos, level.sin, level.mask, use_reentrant=False)
        return block(x, level.cos, level.sin, level.mask)

    def _subsample(self, node: Sub, x: Tensor, level: Level, sels: list) -> Tensor:
        ratio = None
        if self.training and self.config.keep_anneal_steps > 0:  # a host float: K is a shape
            ratio = self.config.keep_ratios_at(self._step)[node.index]
        sel = self.subsamples[node.index](x, level.valid, self.step_tensor, ratio, level.pos)
        sels[node.index] = sel
        if sel.k == 0:  # nothing kept anywhere: U returns x, B gives x + b (x - x) = x
            return x
        xg = gather_tokens(x, sel.idx)  # (B, K, C)
        inner = self.make_level(level.pos.gather(1, sel.idx), sel.valid, level.seq_len)
        h = self._run(node.children, xg, inner, sels)
        b = self.bypasses[node.index].scale_value(self.step_tensor)
        return upsample_bypass(x, xg, h, sel.idx, sel.weight, b)

    # ---- weights I/O (subllm/model/io.py) --------------------------------------------------
    def save_pretrained(self, directory) -> None:
        io.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, map_location: str = "cpu", verify: bool = True) -> SubLLM:
        """Load a model folder or a run folder (its checkpoints/latest); `verify` checks the weights
        against their recorded sha256."""
        cfg, state = io.read_pretrained(directory, map_location=map_location, verify=verify)
        model = cls(cfg)
        io.load_state_checked(model, state, io.resolve_checkpoint(directory))
        return model.to(map_location)

    @classmethod
    def from_hf_llama(
        cls, hf_model, structure: str | None = None, keep_ratio=None, start: str = "identity"
    ) -> SubLLM:
        cfg, state = io.hf_llama_config_state(hf_model, structure, keep_ratio, start)
        model = cls(cfg)
        model.load_state_dict(state, strict=False)
        return model


def load_model(path, device: str = "cpu") -> SubLLM:
    """THE checkpoint loader of every entry point: a model folder or a run folder, in eval mode."""
    return SubLLM.from_pretrained(path, map_location=device).eval()


def _keep_fractions(sels: list[Selection | None]) -> Tensor:
    """Realised kept/real tokens per S, averaged over the batch rows (0 where S never ran): a (n_S,)
    tensor on the model's device - no host sync; callers that log it convert it."""
    vals = [
        (s.n_kept.float() / s.n_real.clamp(min=1).float()).mean() if s is not None else None for s in sels
    ]
    dev = next((v.device for v in vals if v is not None), None)
    return (
        torch.stack([v if v is not None else torch.zeros((), device=dev) for v in vals])
        if vals
        else torch.zeros(0)
    )


def _agreement(sels: list[Selection | None]) -> Tensor | None:
    vals = [s.agreement for s in sels if s is not None and s.agreement is not None]
    return torch.stack(vals) if vals else None


__all__ = ["SubLLM", "SubLLMOutput", "load_model", "Level", "attention_mask_for", "iter_subs"]
