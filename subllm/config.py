"""Model configuration: the `ModelConfig` dataclass, the structure-string parser and `PRESETS`.

The architecture is written as a structure string (docs/method.md section 1):
`T` is a transformer layer, `(` a subsampling module S, `)` the matching upsampling U + bypass B.
`TTTTT(TTTTT(TTTT)TTTTT)TTTTT` is the released 1.3B SUBLLM; all-`T` is the LLaMA baseline.
`M` is a Mixture-of-Depths layer (Raposo et al. 2024; subllm/model/mod.py): a `T` layer with
its own router that runs on the top `mod_capacity` share of the tokens reaching it - parsed as a
one-layer subsampling module (`Sub` with `mod=True`), so every tree walk treats it like a bracket.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from subllm.errors import SubLLMError


@dataclass(frozen=True)
class Sub:
    """One bracket pair: subsampling module number `index` (structure order) around `children`."""

    index: int
    children: tuple  # of int (layer index) | Sub
    mod: bool = False  # an `M` layer: a router around the one layer in children (no bypass)


def parse_structure(structure: str) -> tuple:
    """Parse a structure string into a tree: a tuple of layer indexes (int) and `Sub` nodes.

    Layers (`T` and `M`) are numbered 0.. left to right, subsampling modules 0.. in the order of
    their `(` or `M` (an `M` is a module around its own layer). Errors name the offending position.
    """
    if not isinstance(structure, str) or not structure:
        raise SubLLMError("structure must be a non-empty string of 'T', 'M', '(' and ')'")
    stack: list[tuple[int, int, list]] = []  # (sub index, position of '(', children)
    top: list = []
    current = top
    n_layers = n_subs = 0
    for pos, ch in enumerate(structure):
        if ch == "T":
            current.append(n_layers)
            n_layers += 1
        elif ch == "M":
            current.append(Sub(n_subs, (n_layers,), mod=True))
            n_layers += 1
            n_subs += 1
        elif ch == "(":
            stack.append((n_subs, pos, current))
            n_subs += 1
            current = []
        elif ch == ")":
            if not stack:
                raise SubLLMError(f"structure {structure!r}: unbalanced ')' at position {pos}")
            index, open_pos, parent = stack.pop()
            if not current:
                raise SubLLMError(
                    f"structure {structure!r}: empty brackets at positions {open_pos}-{pos} "
                    "(a subsampling module needs at least one layer inside)"
                )
            parent.append(Sub(index, tuple(current)))
            current = parent
        else:
            raise SubLLMError(
                f"structure {structure!r}: invalid character {ch!r} at position {pos} "
                "(only 'T', 'M', '(' and ')')"
            )
    if stack:
        raise SubLLMError(f"structure {structure!r}: unclosed '(' at position {stack[-1][1]}")
    if n_layers == 0:
        raise SubLLMError(f"structure {structure!r}: no layer at all (needs at least one 'T' or 'M')")
    return tuple(top)


def iter_subs(tree: tuple):
    """All `Sub` nodes of a parsed tree, in structure order (pre-order)."""
    for node in tree:
        if isinstance(node, Sub):
            yield node
            yield from iter_subs(node.children)


def module_names(structure: str) -> list[str]:
    """Display names of the subsampling modules in structure order: S<i> for a bracket's S, M<i>
    for an `M` layer's router (one numbering, the index into keep_ratios and SubLLM.subsamples)."""
    return [f"{'M' if sub.mod else 'S'}{sub.index}" for sub in iter_subs(parse_structure(structure))]


@dataclass
class ModelConfig:
    """Everything that defines a SUBLLM (or, with an all-`T` structure, a LLaMA)."""

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    ffn_dim: int = 5504
    structure: str = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"
    keep_ratio: float | list[float] = 0.64  # one for all S, or one per '(' in structure order
    # Mixture-of-Depths `M` layers (subllm/model/mod.py; ignored without an `M`)
    mod_capacity: float = 0.125  # share of the tokens reaching an `M` layer that it processes
    mod_router: str = "aux_loss"  # inference rule: "aux_loss" (router > theta) | "predictor" (MLP)
    mod_aux_loss: float = 0.1  # weight of the BCE that teaches the router / predictor the top-k
    mod_predictor_dim: int = 64  # hidden width of the "predictor" MLP
    # what scales the update: "sigmoid" of the router value (default: measured better, RESULTS.md
    # issue 12) | "raw" router value (MoD's equation 1) | "clamp" clamp(r, 0, 1) (an identity start)
    mod_weight: str = "sigmoid"
    rope_theta: float = 10000.0
    # RoPE scaling, Hugging Face's rope_parameters dict without rope_theta (subllm/model/rope.py):
    # rope_type default | linear | dynamic | yarn | llama3 and its parameters; None = plain RoPE
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02
    # schedules (method.md sections 4, 5, 7): piecewise-linear in the training step
    balancer_prob_start: float = 1.0
    balancer_prob_end: float = 0.25
    balancer_steps: int = 8000
    bypass_min_start: float = 0.9
    bypass_min_end: float = 0.2
    bypass_steps: int = 20000
    # the score Balancer (method.md section 4) and the score layer's initialisation
    balancer_grad_scale: float = 0.04
    balancer_gate: str = "grad"  # "grad" (paper: |grad| per score) | "weight" (beyond the paper)
    # How S learns to select at inference what it selects in training (issue 9): the defaults are
    # the "aligned" recipe, measured in docs/RESULTS.md; SELECTION_RECIPES["paper"] is the paper's
    # rule (subllm-1.3b, and any config.json written before these fields existed).
    # subllm/model/subsample.py SelectOptions explains each.
    score_init_std: float | None = None  # None: 1/sqrt(dim) with score_norm (unit scores), else init_std
    score_norm: bool = True  # score on x / rms(x) instead of x (beyond the paper)
    score_lr_scale: float = 0.5  # the score layers' learning rate, a multiple of the base lr
    balancer_fraction: str = "direct"  # "gaussian" (paper: mean/std proxy) | "direct" (counted)
    select_loss: float = 0.1  # weight of the auxiliary BCE of sigmoid(s / tau) vs top-k (0 = off)
    select_loss_tau: float = 1.0
    select_loss_detach: bool = False  # the auxiliary loss trains the score layer only (x detached)
    threshold: str = "calibrated"  # "zero" (paper: keep iff s > 0) | "calibrated" (keep iff s > theta)
    threshold_momentum: float = 0.95
    # "value" (paper): a kept token's training weight is clamp(s, 0, 1) minus its discarded partner's;
    # "grad": the partner is subtracted in the gradient only, the weight's value is clamp(s, 0, 1)
    # as at inference (an identity start has every score >= 1, so "value" weights are 0 there);
    # "straight": as "grad", the gradient passed straight through the clamps (saturated scores learn)
    subtraction: str = "value"
    bypass: bool = True  # False: no bypass B, z = U(x, h) (the ablation "bypass off")
    # Starting from a pretrained LLaMA without a jump (issue 20, beyond the paper): a learned score
    # bias initialised to `score_bias` (None = no bias, the paper), the bypass scales initialised to
    # `bypass_init` (0.5 in the paper), and in training the keep ratio annealed linearly from 1.0
    # to keep_ratio over `keep_anneal_steps` steps (0 = no annealing). `identity_start` sets the
    # first two so that at keep ratio 1.0 the model equals its source exactly.
    score_bias: float | None = None
    bypass_init: float = 0.5
    keep_anneal_steps: int = 0
    # every S (and M router) keeps the tokens at original positions < keep_first whatever their
    # score, with weight 1: a pretrained LLaMA's attention sink (the first token) stays visible to
    # the inner layers (dropping it cost SmolLM2 +0.78 nats on top of a random 10% drop)
    keep_first: int = 0
    extra: dict = field(default_factory=dict)  # free-form metadata carried through to_dict/from_dict

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SubLLMError(f"{name} must be a positive integer, got {v!r}")
        if self.dim % self.n_heads:
            raise SubLLMError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise SubLLMError(f"head dim ({self.head_dim}) must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise SubLLMError(f"n_heads ({self.n_heads}) is not divisible by n_kv_heads ({self.n_kv_heads})")
        if self.rope_scaling is not None:
            from subllm.model.rope import check_rope_scaling  # imports torch: only when it is used

            self.rope_scaling = check_rope_scaling(self.rope_scaling, self.rope_theta, self.max_seq_len)
        parse_structure(self.structure)  # errors name the offending position
        n_subs = self.structure.count("(")
        ratios = self.keep_ratio if isinstance(self.keep_ratio, list | tuple) else None
        if ratios is not None:
            if len(ratios) != n_subs:
                raise SubLLMError(
                    f"keep_ratio has {len(ratios)} values but structure {self.structure!r} "
                    f"has {n_subs} subsampling modules"
                )
            self.keep_ratio = [float(r) for r in ratios]
        c = self.mod_capacity
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0.0 < c <= 1.0:
            raise SubLLMError(f"mod_capacity must lie in (0, 1], got {c!r}")
        for i, r in enumerate(self.keep_ratios):
            if not (isinstance(r, int | float) and 0.0 < r <= 1.0):
                raise SubLLMError(f"keep ratio of subsampling module {i} must lie in (0, 1], got {r!r}")
        if self.mod_router not in MOD_ROUTERS:
            raise SubLLMError(f"mod_router must be one of {MOD_ROUTERS}, got {self.mod_router!r}")
        if self.subtraction not in ("value", "grad", "straight"):
            raise SubLLMError(f"subtraction must be 'value', 'grad' or 'straight', got {self.subtraction!r}")
        if self.mod_weight not in ("raw", "sigmoid", "clamp"):
            raise SubLLMError(f"mod_weight must be 'raw', 'sigmoid' or 'clamp', got {self.mod_weight!r}")
        if not isinstance(self.mod_predictor_dim, int) or self.mod_predictor_dim <= 0:
            raise SubLLMError(f"mod_predictor_dim must be a positive integer, got {self.mod_predictor_dim!r}")
        if self.balancer_steps <= 0 or self.bypass_steps <= 0:
            raise SubLLMError("balancer_steps and bypass_steps must be positive")
        if self.balancer_gate not in ("grad", "weight"):
            raise SubLLMError(f"balancer_gate must be 'grad' or 'weight', got {self.balancer_gate!r}")
        if not self.balancer_grad_scale >= 0:
            raise SubLLMError(f"balancer_grad_scale must be >= 0, got {self.balancer_grad_scale!r}")
        for name in ("keep_anneal_steps", "keep_first"):
            k = getattr(self, name)
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise SubLLMError(f"{name} must be an integer >= 0, got {k!r}")
        if self.score_bias is not None and (
            isinstance(self.score_bias, bool) or not isinstance(self.score_bias, int | float)
        ):
            raise SubLLMError(f"score_bias must be a number or None, got {self.score_bias!r}")
        if self.score_init_std is not None and not self.score_init_std > 0:
            raise SubLLMError(f"score_init_std must be positive (or None), got {self.score_init_std!r}")
        if self.balancer_fraction not in ("gaussian", "direct"):
            raise SubLLMError(
                f"balancer_fraction must be 'gaussian' or 'direct', got {self.balancer_fraction!r}"
            )
        if self.threshold not in ("zero", "calibrated"):
            raise SubLLMError(f"threshold must be 'zero' or 'calibrated', got {self.threshold!r}")
        for name, lo, hi in (
            ("select_loss", 0.0, float("inf")),
            ("select_loss_tau", 1e-6, float("inf")),
            ("threshold_momentum", 0.0, 1.0),
            ("score_lr_scale", 0.0, float("inf")),
            ("mod_aux_loss", 0.0, float("inf")),
            ("bypass_init", 0.0, 1.0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
                raise SubLLMError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tree(self) -> tuple:
        return parse_structure(self.structure)

    @property
    def n_layers(self) -> int:
        return self.structure.count("T") + self.structure.count("M")

    @property
    def n_subsamples(self) -> int:
        """Subsampling modules: one per `(` and one per `M` layer (its router)."""
        return self.structure.count("(") + self.structure.count("M")

    def keep_ratios_at(self, step: int | None) -> list[float]:
        """The training keep ratio per subsampling module at `step`: keep_ratios, or with
        keep_anneal_steps > 0, 1 - (1 - r) * min(step / keep_anneal_steps, 1)."""
        n = self.keep_anneal_steps
        if n <= 0 or step is None:
            return self.keep_ratios
        a = min(step / n, 1.0)
        return [1.0 - (1.0 - r) * a for r in self.keep_ratios]

    @property
    def mod_flags(self) -> list[bool]:
        """Per subsampling module in structure order: True for an `M` layer's router."""
        return [sub.mod for sub in iter_subs(self.tree)]

    @property
    def keep_ratios(self) -> list[float]:
        """One keep ratio per subsampling module, in structure order (`M`: mod_capacity)."""
        per_s = iter(
            self.keep_ratio
            if isinstance(self.keep_ratio, list | tuple)
            else [float(self.keep_ratio)] * self.structure.count("(")
        )
        return [float(self.mod_capacity) if mod else float(next(per_s)) for mod in self.mod_flags]

    def as_llama(self) -> ModelConfig:
        """The same-size LLaMA baseline: every bracket removed, `M` layers made `T`, all else equal."""
        structure = self.structure.replace("(", "").replace(")", "").replace("M", "T")
        return dataclasses.replace(self, structure=structure, keep_ratio=1.0, extra=dict(self.extra))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["keep_ratio"], tuple):
            d["keep_ratio"] = list(d["keep_ratio"])
        if d["rope_scaling"] is None:  # plain RoPE: config.json exactly as before the field existed
            del d["rope_scaling"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config.json written before a selection field existed is a paper-rule model: such
        missing fields take the paper's values (SELECTION_RECIPES["paper"]), not today's defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"model_type", "architectures", "auto_map", "n_layers"})
        if unknown:
            raise SubLLMError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        legacy = {k: v for k, v in SELECTION_RECIPES["paper"].items() if k not in d}
        return cls(**{**legacy, **{k: v for k, v in d.items() if k in names}})

    def with_selection(self, recipe: str) -> ModelConfig:
        """This config with a named selection recipe (SELECTION_RECIPES) applied."""
        if recipe not in SELECTION_RECIPES:
            names = ", ".join(SELECTION_RECIPES)
            raise SubLLMError(f"unknown selection recipe {recipe!r}; choose one of: {names}")
        return self.replace(**SELECTION_RECIPES[recipe])

    @property
    def selection(self) -> str | None:
        """The name of the selection recipe this config follows exactly (None = a custom mix)."""
        for name, fields in SELECTION_RECIPES.items():
            if all(getattr(self, k) == v for k, v in fields.items()):
                return name
        return None


# Named selection rules (issue 9). "paper": the released method, bit for bit (the rule of
# subllm-1.3b and of converted official checkpoints); "aligned": the default, chosen by the
# ablation in docs/RESULTS.md. Every key is a ModelConfig field.
_PAPER_SELECTION = dict(
    balancer_gate="grad",
    balancer_fraction="gaussian",
    score_norm=False,
    score_init_std=None,
    score_lr_scale=0.5,
    select_loss=0.0,
    select_loss_tau=1.0,
    select_loss_detach=False,
    threshold="zero",
    threshold_momentum=0.95,
    subtraction="value",
)
SELECTION_RECIPES: dict[str, dict] = {
    "paper": _PAPER_SELECTION,
    "aligned": {
        **_PAPER_SELECTION,
        "score_norm": True,
        "select_loss": 0.1,
        "threshold": "calibrated",
        "balancer_fraction": "direct",
    },
}


MOD_ROUTERS = ("aux_loss", "predictor")


def keep_count(n: int, ratio: float) -> int:
    """ceil(ratio * n), robust to float error (0.64 * 100 must give 64, not 65)."""
    return min(n, math.ceil(ratio * n - 1e-9))


_SUBLLM = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"

PRESETS: dict[str, ModelConfig] = {
    # the released 1.3B configs (method.md sections 1 and 11: RMSNorm eps 1e-5, as their code uses)
    "subllm-1.3b": ModelConfig(norm_eps=1e-5).with_selection("paper"),
    "llama-1.3b": ModelConfig(norm_eps=1e-5).with_selection("paper").as_llama(),
    # the paper's exact 24-layer structure at a width a 2-core CPU can benchmark
    "subllm-small": ModelConfig(
        vocab_size=8192, dim=256, n_heads=4, ffn_dim=688, max_seq_len=16384, structure=_SUBLLM
    ),
    "llama-small": ModelConfig(
        vocab_size=8192, dim=256, n_heads=4, ffn_dim=688, max_seq_len=16384, structure=_SUBLLM
    ).as_llama(),
    # a tiny nested pair with GQA, for tests
    "subllm-tiny": ModelConfig(
        vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=512, structure="TT(T(TT)T)T"
    ),
    "llama-tiny": ModelConfig(
        vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=512, structure="TT(T(TT)T)T"
    ).as_llama(),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise SubLLMError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], extra=dict(PRESETS[name].extra))


# The score bias and score-weight scale of an identity start: every score is 1.05 + a tiny random
# part (std 0.01 / sqrt(dim) per weight on RMS-normalised input: about 0.01), so each token scores
# >= 1 (weight clamp(s, 0, 1) = 1) and is kept by the inference rule s > 0; with bypass scales of
# 1.0 a kept token passes exactly: at keep ratio 1.0 the model equals its source. An `M` layer's
# update is scaled by clamp(r, 0, 1) (mod_weight "clamp"), so at capacity 1.0 it is its source layer.
IDENTITY_SCORE_BIAS = 1.05


def identity_start(config: ModelConfig) -> ModelConfig:
    """`config` set up to start where its source LLaMA is (see IDENTITY_SCORE_BIAS)."""
    return config.replace(
        score_bias=IDENTITY_SCORE_BIAS,
        score_norm=True,
        score_init_std=0.01 * config.dim**-0.5,
        bypass_init=1.0,
        keep_first=1,
        mod_weight="clamp",
    )
