"""GGUF in: a llama-architecture GGUF file (llama.cpp's format) -> a SubLLM checkpoint or an HF Llama folder.

    subllm convert --from-gguf SmolLM2-135M-Instruct.Q4_1.gguf --out DIR [--structure S --keep-ratio R]

1. `inspect_gguf` reads the header (`gguf.GGUFReader` memory-maps the file; no tensor data is read)
   and rejects, with a one-line SubLLMError naming the file, anything that is not a complete plain
   llama GGUF: not GGUF at all, truncated or corrupt, another architecture, llama variants that
   transformers would load wrongly without a word (RoPE scaling, MoE experts, biases or any other
   extra tensor, head_dim != dim / n_heads), or a tensor type gguf cannot dequantize.
2. `load_gguf_llama`: transformers' own GGUF support (`from_pretrained(folder, gguf_file=name)`)
   dequantizes every tensor to float32, undoes llama.cpp's q/k row order (RoPE on adjacent pairs
   (2i, 2i+1) -> HF's rotate-half pairs (i, i + head_dim/2)) and builds the tokenizer, chat template
   included, from the metadata.
3. That model carries a GgufConfig quantization config, which `save_pretrained` refuses: `plain_llama`
   hands its state dict to a plain LlamaForCausalLM (no copy, no random init).
4. `from_gguf` turns it into a SubLLM (subllm/hf/llama.py, docs/method.md section 1; all-T: the same
   logits) and saves the tokenizer beside it; `gguf_to_hf_llama_dir` saves the Llama itself. Both
   reload the saved tokenizer and check that it encodes, and renders the chat template, exactly as
   the GGUF one does.

gguf and transformers (which wants accelerate for `gguf_file=`) are imported inside the functions.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from subllm.errors import SubLLMError

ARCHITECTURE = "llama"
# the per-block tensors of a plain llama GGUF (llama.cpp's names, without ".weight")
BLOCK_TENSORS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece: transformers rebuilds both
# texts the saved tokenizer must encode exactly as the GGUF one does (its special tokens are added)
PROBE_TEXTS = (
    "The capital of France is",
    "  leading spaces, double  spaces,\ttabs\nand\n\nnewlines ",
    "Numbers 1234567 3.14159, punctuation!?... and CAPS",
    "naïve café, 日本語, emoji 🤖",
    "def f(x):\n    return x ** 2  # code",
)
PROBE_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@dataclass(frozen=True)
class GGUFInfo:
    """What `inspect_gguf` read from a llama GGUF's header."""

    path: Path
    file_size: int
    name: str | None
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int | None
    tied: bool  # no output.weight: the head shares token_embd
    tokenizer_model: str
    tensor_types: dict[str, int]  # ggml type -> number of tensors, e.g. {"Q4_1": 210, "F32": 61}

    def types_line(self) -> str:
        """'Q4_1 x210 + Q8_0 x1 + F32 x61'"""
        return " + ".join(f"{t} x{n}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: -kv[1]))


@dataclass
class GGUFConversion:
    """What `from_gguf` / `gguf_to_hf_llama_dir` made: the model saved, the header, seconds per step."""

    model: torch.nn.Module
    info: GGUFInfo
    seconds: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now


# ---- the header -----------------------------------------------------------------------------------
def inspect_gguf(path) -> GGUFInfo:
    """Check, from the header alone, that `path` is a complete plain llama GGUF; SubLLMError if not."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SubLLMError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)  # metadata + tensor table; the tensor data stays memory-mapped
    except Exception as e:
        # gguf 0.19.0: random bytes -> ValueError "GGUF magic invalid"; empty file -> ValueError "cannot
        # mmap an empty file"; cut or garbled metadata -> IndexError; cut inside the tensor data ->
        # ValueError "cannot reshape array ..."
        if "magic" in str(e):
            raise SubLLMError(f"{path}: not a GGUF file (bad magic bytes)") from None
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        raise SubLLMError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {reason})") from None

    def value(key: str, default=None):
        f = reader.get_field(key)
        return default if f is None else f.contents()

    arch = value("general.architecture")
    if arch != ARCHITECTURE:
        raise SubLLMError(f"{path}: GGUF architecture is {arch!r}; only {ARCHITECTURE!r} is supported")
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:  # the reader usually fails first on a cut file
        raise SubLLMError(f"{path}: truncated GGUF file (tensor data ends at byte {end}, the file at {size})")

    def required(key: str) -> int:
        v = value(f"{arch}.{key}")
        if v is None:
            raise SubLLMError(f"{path}: llama GGUF without {arch}.{key}")
        return int(v)

    n_layers, dim = required("block_count"), required("embedding_length")
    n_heads, ffn_dim = required("attention.head_count"), required("feed_forward_length")
    n_kv_heads = int(value(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(value(f"{arch}.rope.dimension_count", dim // n_heads))
    if head_dim * n_heads != dim:
        raise SubLLMError(f"{path}: head_dim {head_dim} * {n_heads} heads != dim {dim} is not supported")
    rope_scaling = value(f"{arch}.rope.scaling.type")
    if rope_scaling not in (None, "none"):
        raise SubLLMError(f"{path}: llama GGUF with RoPE scaling {rope_scaling!r} is not supported")
    if int(value(f"{arch}.expert_count", 0) or 0) > 0:
        raise SubLLMError(f"{path}: llama GGUF with MoE experts (Mixtral-style) is not supported")

    tokenizer_model = value("tokenizer.ggml.model")
    if tokenizer_model not in TOKENIZER_MODELS:
        raise SubLLMError(
            f"{path}: tokenizer.ggml.model is {tokenizer_model!r}, not one of {TOKENIZER_MODELS}"
        )
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise SubLLMError(f"{path}: GGUF file without a vocabulary (tokenizer.ggml.tokens)")
    vocab_size = len(tokens.data)

    # exactly the tensors of a plain llama: none missing, none the Llama has no place for
    names = {t.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in BLOCK_TENSORS}
    if missing := sorted(expected - names):
        raise SubLLMError(f"{path}: {len(missing)} llama tensors missing, e.g. {missing[:3]}")
    if extra := sorted(names - expected - {"output.weight"}):
        raise SubLLMError(f"{path}: tensors a plain llama does not have, e.g. {extra[:3]}")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if [int(d) for d in embd.shape] != [dim, vocab_size]:  # ggml order: (dim, vocab)
        raise SubLLMError(
            f"{path}: token_embd has shape {list(map(int, embd.shape))}, not {[dim, vocab_size]}"
        )
    types = Counter(t.tensor_type for t in reader.tensors)
    if bad := sorted(t.name for t in types if not _dequantizable(t)):
        raise SubLLMError(f"{path}: tensors of type {', '.join(bad)}, which gguf cannot dequantize")

    context = value(f"{arch}.context_length")
    return GGUFInfo(
        path=path,
        file_size=size,
        name=value("general.name"),
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim,
        vocab_size=vocab_size,
        context_length=None if context is None else int(context),
        tied="output.weight" not in names,
        tokenizer_model=tokenizer_model,
        tensor_types={t.name: n for t, n in types.items()},
    )


def _dequantizable(qtype) -> bool:
    """Whether gguf can dequantize a tensor of ggml type `qtype` (tried on one block of zeros)."""
    import gguf
    import numpy as np

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


# ---- the model and tokenizer ----------------------------------------------------------------------
def load_gguf_llama(path):
    """(model, tokenizer) as transformers loads them from a llama GGUF, weights dequantized to float32.

    The model holds a GgufConfig quantization config and cannot be saved; `plain_llama` can."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    kwargs = dict(gguf_file=path.name, local_files_only=True)  # gguf_file is relative to the folder
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = LlamaForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def plain_llama(gguf_model):
    """A plain LlamaForCausalLM (no quantization config) sharing `gguf_model`'s tensors, eval mode.

    `from_pretrained(None, config=, state_dict=)` builds it on the meta device (no random init) and
    re-ties tied embeddings; every parameter is checked to come from the GGUF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's general.name lands here; it is not a path
    config = LlamaConfig.from_dict(config)
    state = gguf_model.state_dict()
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32)
    loaded = model.state_dict()
    if loaded.keys() != state.keys() or not all(torch.equal(loaded[k], v) for k, v in state.items()):
        raise RuntimeError("the plain Llama does not hold exactly the GGUF model's weights")  # a bug
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head lost its tie to embed_tokens")
    model.generation_config = gguf_model.generation_config
    return model.eval()


def read_gguf(info: GGUFInfo, clock: _Clock | None = None):
    """(plain LlamaForCausalLM in float32, tokenizer) of the GGUF `inspect_gguf` described as `info`;
    SubLLMError for non-finite weights (corrupt tensor data)."""
    gguf_model, tokenizer = load_gguf_llama(info.path)
    if clock:
        clock.step("dequantize")
    if bad := [n for n, p in gguf_model.state_dict().items() if not torch.isfinite(p).all()]:
        raise SubLLMError(
            f"{info.path}: corrupt tensor data (non-finite values in {len(bad)}, e.g. {bad[:3]})"
        )
    return plain_llama(gguf_model), tokenizer


def save_tokenizer(tokenizer, out) -> None:
    """Save the GGUF-built tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) into
    `out` and check that the folder's tokenizer encodes and renders chats exactly like it."""
    # the loading arguments would otherwise be written into tokenizer_config.json
    for key in ("local_files_only", "is_local", "gguf_file", "vocab_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(str(out))
    check_same_tokenizer(tokenizer, out)


def check_same_tokenizer(tokenizer, folder) -> None:
    """SubLLMError unless the tokenizer saved in `folder` (loaded as every command loads it) encodes
    the probe texts and special tokens, and renders the chat template, exactly like `tokenizer`."""
    from subllm.data.tokenizer import load_tokenizer

    saved = load_tokenizer(folder)
    for text in PROBE_TEXTS + tuple(tokenizer.all_special_tokens):
        if saved(text).input_ids != tokenizer(text).input_ids:
            raise SubLLMError(f"{folder}: the saved tokenizer encodes {text!r} unlike the GGUF's")
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if getattr(saved, role) != getattr(tokenizer, role):
            raise SubLLMError(
                f"{folder}: saved {role} {getattr(saved, role)!r}, GGUF {getattr(tokenizer, role)!r}"
            )
    if tokenizer.chat_template:
        render = dict(tokenize=False, add_generation_prompt=True)
        if saved.apply_chat_template(PROBE_CHAT, **render) != tokenizer.apply_chat_template(
            PROBE_CHAT, **render
        ):
            raise SubLLMError(f"{folder}: the saved chat template renders unlike the GGUF's")


# ---- conversions ----------------------------------------------------------------------------------
def check_target(info: GGUFInfo, structure: str | None, keep_ratio) -> None:
    """Fail before the (slow) dequantization: `structure` / `keep_ratio` must fit the GGUF's model."""
    from subllm.config import ModelConfig
    from subllm.hf.llama import check_keep_ratio

    check_keep_ratio(structure, keep_ratio)
    if structure is None:
        return
    cfg = ModelConfig(  # parses the structure and checks one keep ratio per S
        vocab_size=info.vocab_size,
        dim=info.dim,
        n_heads=info.n_heads,
        n_kv_heads=info.n_kv_heads,
        ffn_dim=info.ffn_dim,
        structure=structure,
        keep_ratio=0.64 if keep_ratio is None else keep_ratio,
    )
    if cfg.n_layers != info.n_layers:  # T and M layers both count
        name = info.path.name
        raise SubLLMError(f"structure {structure!r} has {cfg.n_layers} layers, {name} has {info.n_layers}")


def from_gguf(
    gguf_path, out, structure: str | None = None, keep_ratio=None, rope_scaling=None, max_seq_len=None
) -> GGUFConversion:
    """Convert a llama GGUF into a SubLLM checkpoint folder `out` (config.json, model.safetensors,
    tokenizer, chat template) that `subllm generate` / `load_model` read. Without `structure`: the
    all-T SubLLM, whose logits equal the dequantized Llama's; with it, S and B modules are new (the
    options are subllm/hf/llama.py `subllm_from_llama`'s)."""
    from subllm.hf.llama import subllm_from_llama

    clock = _Clock()
    info = inspect_gguf(gguf_path)
    check_target(info, structure, keep_ratio)
    clock.step("inspect")
    hf, tokenizer = read_gguf(info, clock)
    model = subllm_from_llama(hf, structure, keep_ratio, rope_scaling, max_seq_len)
    del hf
    clock.step("convert")
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    clock.step("save")
    return GGUFConversion(model, info, clock.seconds)


def gguf_to_hf_llama_dir(gguf_path, out) -> GGUFConversion:
    """Convert a llama GGUF into a Hugging Face folder (float32 safetensors, tokenizer, chat template)
    that LlamaForCausalLM / AutoTokenizer.from_pretrained(out) load."""
    clock = _Clock()
    info = inspect_gguf(gguf_path)
    clock.step("inspect")
    hf, tokenizer = read_gguf(info, clock)
    Path(out).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    clock.step("save")
    return GGUFConversion(hf, info, clock.seconds)


__all__ = [
    "GGUFInfo",
    "GGUFConversion",
    "inspect_gguf",
    "load_gguf_llama",
    "plain_llama",
    "read_gguf",
    "save_tokenizer",
    "check_same_tokenizer",
    "check_target",
    "from_gguf",
    "gguf_to_hf_llama_dir",
]
