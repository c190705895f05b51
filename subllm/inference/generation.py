"""Text generation: logits processing, sampling, `generate` / `stream_generate`, text deltas.

docs/method.md section 3 (inference mode). The fast path prefills a KVCache and decodes one token
per row (subllm/inference/engine.py); `use_cache=False` is the obviously-correct reference that recomputes
the full eval-mode forward (with attention_mask) at every step. Both share the sampling loop below,
so a difference between them can only come from the model computation; tests compare them.

Logits processing follows Hugging Face's order and semantics: repetition penalty, then temperature,
top-k, top-p. `temperature == 0` is greedy (argmax after the repetition penalty). Sampling draws
from a `torch.Generator` seeded by `seed`, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from subllm.errors import SubLLMError
from subllm.inference.chunked_prefill import prefill_any
from subllm.inference.engine import decode_step, new_cache
from subllm.model.subllm import SubLLM

# ---- logits processing ------------------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (n, V), seen (n, V) bool: tokens already in the row (prompt or generated) get
    logit / penalty when positive and logit * penalty otherwise (CTRL / HF semantics)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p
    (always at least the most likely one); the rest become -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (n, V) -> token ids (n,): argmax when temperature == 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


# ---- argument checks --------------------------------------------------------------------------


def validate_sampling(
    max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, repetition_penalty=None, seed=None
) -> None:
    """Clear SubLLMErrors for out-of-range generation settings (also used by the CLI)."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise SubLLMError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not is_num(temperature) or temperature < 0:
        raise SubLLMError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise SubLLMError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_p is not None and (not is_num(top_p) or not 0 < top_p <= 1):
        raise SubLLMError(f"top_p must lie in (0, 1] (or None), got {top_p!r}")
    if repetition_penalty is not None and (not is_num(repetition_penalty) or repetition_penalty <= 0):
        raise SubLLMError(f"repetition_penalty must be a number > 0 (1 = off), got {repetition_penalty!r}")
    if seed is not None and not is_int(seed):
        raise SubLLMError(f"seed must be an integer (or None), got {seed!r}")


def _validate_inputs(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    if not isinstance(model, SubLLM):
        raise SubLLMError(f"model must be a SubLLM, got {type(model).__name__}")
    cfg = model.config
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise SubLLMError("input_ids must be a non-empty (batch, time) tensor of token ids")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise SubLLMError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size:
        raise SubLLMError(f"input_ids must lie in [0, {cfg.vocab_size}) (the model's vocabulary)")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise SubLLMError("attention_mask must be a tensor of the same shape as input_ids")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise SubLLMError("attention_mask must hold only 0 (pad) and 1 (real token)")
        if not bool(attention_mask.bool().any(1).all()):
            raise SubLLMError("every row of attention_mask needs at least one real token (a 1)")
    T = input_ids.shape[1]
    if T + max_new_tokens > cfg.max_seq_len:
        raise SubLLMError(
            f"prompt width {T} + max_new_tokens {max_new_tokens} exceeds max_seq_len {cfg.max_seq_len}"
        )
    eos = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    for e in [*eos, pad_token_id]:
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < cfg.vocab_size:
            raise SubLLMError(f"eos/pad token ids must be integers in [0, {cfg.vocab_size}), got {e!r}")
    return eos


# ---- the two step runners: cached (engine) and uncached (reference) ---------------------------


def prefill_autocast(prefill_dtype: str | None, device):
    """The region a prompt's prefill runs in: None = whatever encloses it (decode's autocast);
    "bf16" = bf16 autocast; "fp32" = no autocast, only under an fp32 decode (a chunked fp32 prefill
    cannot attend to a bf16 cache). The KV cache is made outside it, so it keeps the decode dtype (a
    bf16 prefill's K/V are stored in the fp32 cache as they come)."""
    import contextlib

    from subllm.dtype import _BF16_NAMES, _FP32_NAMES, autocast

    if prefill_dtype is None:
        return contextlib.nullcontext()
    if prefill_dtype in _FP32_NAMES:
        if torch.is_autocast_enabled(torch.device(device).type):
            raise SubLLMError("an fp32 prefill under a bf16 decode is not supported: use the same dtype")
        return contextlib.nullcontext()
    if prefill_dtype in _BF16_NAMES:
        return autocast("bf16", device)
    raise SubLLMError(f"prefill_dtype must be bf16, fp32 or None, got {prefill_dtype!r}")


def prefill_casts_kept(prefill_dtype: str | None, device):
    """A region to hold around many bf16 prefills under an fp32 decode (serve's worker thread). torch
    drops autocast's bf16 copies of the weights when the outermost autocast region ends - after every
    prompt chunk the server runs (~75 ms of casts per chunk for SmolLM2-135M on one core, as much as
    the matmuls of a 64-token prompt); inside this (disabled) outer region they are kept, so each
    weight is cast once per process, at the price of holding the copies: half the fp32 weights' bytes.
    A no-op for other prefill dtypes and under an enclosing autocast (bf16 decode keeps them anyway)."""
    import contextlib

    from subllm.dtype import _BF16_NAMES

    device_type = torch.device(device).type
    if prefill_dtype in _BF16_NAMES and not torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _Cached:
    def __init__(
        self,
        model: SubLLM,
        ids: Tensor,
        mask: Tensor | None,
        max_new_tokens: int,
        chunk: int | None,
        on_prefill: Callable | None = None,
        prefill_chunk: int | None = None,
        prefill_dtype: str | None = None,
    ):
        self.model, self.ids, self.mask = model, ids, mask
        self.prefill_chunk, self.prefill_dtype = prefill_chunk, prefill_dtype
        self.extra = max_new_tokens if chunk is None else 0  # None: preallocate the whole run
        self.chunk = chunk or 256
        self.cache = None
        self.on_prefill = on_prefill

    def start(self) -> Tensor:
        # created here, at the first step, so that it takes the dtype of an enclosing autocast
        self.cache = new_cache(self.model, self.ids.shape[0], self.ids.device, chunk=self.chunk)
        with prefill_autocast(self.prefill_dtype, self.ids.device):  # the cache keeps decode's dtype
            logits = prefill_any(
                self.model, self.ids, self.mask, self.cache, extra=self.extra, chunk=self.prefill_chunk
            )
        if self.on_prefill is not None:
            self.on_prefill(self.cache)
        return logits

    def step(self, tokens: Tensor, emitted: Tensor, rows: list[int]) -> Tensor:
        return decode_step(self.model, self.cache, tokens[rows], rows)


class _Uncached:
    def __init__(self, model: SubLLM, ids: Tensor, mask: Tensor | None):
        self.model, self.seq = model, ids
        self.mask = torch.ones_like(ids) if mask is None else mask.to(ids.dtype)

    def start(self) -> Tensor:
        logits = self.model(self.seq, self.mask).logits  # (B, T, V)
        T = self.seq.shape[1]
        last = T - 1 - self.mask.flip(1).argmax(1)  # each row's last real token
        return logits[torch.arange(len(last), device=logits.device), last]

    def step(self, tokens: Tensor, emitted: Tensor, rows: list[int]) -> Tensor:
        self.seq = torch.cat([self.seq, tokens[:, None]], 1)
        self.mask = torch.cat([self.mask, emitted[:, None].to(self.mask.dtype)], 1)
        return self.model(self.seq, self.mask).logits[rows, -1]


# ---- generation loop --------------------------------------------------------------------------


def stream_generate(
    model: SubLLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    pad_token_id: int | None = None,
    return_logits: bool = False,
    chunk: int | None = 256,
    on_prefill: Callable | None = None,
    prefill_chunk: int | None = None,
    prefill_dtype: str | None = None,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """Yield the new token of every row, (B,) per step; rows that stopped at an eos token yield
    `pad_token_id` (default: the config's). Stops after `max_new_tokens` steps or when every row
    has stopped; `eos_token_id=None` never stops early. With `return_logits`, yields
    (tokens (B,), raw model logits (B, V) float32 with NaN rows for rows that had stopped).

    The model runs in eval mode during generation (its mode is restored afterwards) under
    torch.no_grad; wrap the loop in torch.autocast for bf16 (the cache is created at the first
    step and takes autocast's dtype). `chunk`: the KV cache grows by `chunk` slots per level when
    full (default: measured as fast as preallocating, and inner levels never reserve room for
    tokens their S will drop); None preallocates prompt + max_new_tokens slots at every level.
    `on_prefill` (opt-in, cached path only): called with the KVCache right after prefill, e.g. to
    snapshot its per-level lengths; when the loop ends the cache holds the prompt and every
    generated token but the last (never fed back). `prefill_chunk` (cached path): prefill the prompt
    that many tokens at a time, so its peak memory is bounded (subllm/inference/chunked_prefill.py; the same
    result). `prefill_dtype` (cached path): "bf16" / "fp32" runs the prompt's prefill in that dtype and
    the decode steps in the enclosing one (prefill is large matmuls, decode small ones: on a CPU with
    native bf16 the first is faster in bf16 - 1.6x on an AVX512-BF16 EPYC, 3.5x on an AMX Xeon - the
    second often not; `prefill_autocast`).
    Arguments are checked here, before the first step.
    """
    validate_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    eos = _validate_inputs(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise SubLLMError(f"chunk must be a positive integer or None, got {chunk!r}")
    if prefill_chunk is not None and (
        not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1
    ):
        raise SubLLMError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    if use_cache:
        prefill_autocast(prefill_dtype, input_ids.device)  # checks the name before the first step
        runner = _Cached(
            model, input_ids, attention_mask, max_new_tokens, chunk, on_prefill, prefill_chunk, prefill_dtype
        )
    else:
        runner = _Uncached(model, input_ids, attention_mask)
    return _loop(model, runner, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                 repetition_penalty, eos, pad, gen, return_logits)  # fmt: skip


def _loop(
    model, runner, ids, mask, max_new_tokens, temperature, top_k, top_p, penalty, eos, pad, gen, with_logits
):
    B, V = ids.shape[0], model.config.vocab_size
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = runner.start().float()  # (n, V) for the `active` rows
        active = list(range(B))
        seen = None
        if penalty is not None:
            seen = torch.zeros(B, V, dtype=torch.bool, device=ids.device)
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            seen[torch.arange(B, device=ids.device)[:, None].expand_as(ids)[real], ids[real]] = True
        eos_t = torch.tensor(eos, dtype=ids.dtype, device=ids.device)
        for t in range(max_new_tokens):
            idx = torch.tensor(active, device=ids.device)
            scores = logits if seen is None else apply_repetition_penalty(logits, seen[idx], penalty)
            new = next_tokens(scores, temperature, top_k, top_p, gen).to(ids.dtype)  # (n,)
            tokens = torch.full((B,), pad, dtype=ids.dtype, device=ids.device)
            tokens[idx] = new
            emitted = torch.zeros(B, dtype=torch.bool, device=ids.device)
            emitted[idx] = True
            if seen is not None:
                seen[idx, new] = True
            done = torch.isin(new, eos_t).tolist() if eos else [False] * len(active)
            still = [r for r, d in zip(active, done) if not d]
            if with_logits:
                full = torch.full((B, V), float("nan"), device=logits.device)
                full[idx] = logits
                yield tokens, full
            else:
                yield tokens
            if not still or t == max_new_tokens - 1:
                return
            with torch.no_grad():
                logits = runner.step(tokens, emitted, still).float()
            active = still
    finally:
        model.train(was_training)


def generate(model: SubLLM, input_ids: Tensor, attention_mask: Tensor | None = None, **options) -> Tensor:
    """Prompt + continuation, (B, T + n) like Hugging Face `generate` (n <= max_new_tokens: fewer
    when every row stopped early); rows that stopped early are padded with pad_token_id.
    `options`: `stream_generate`'s keyword arguments (max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, eos_token_id, use_cache, seed, pad_token_id, chunk, on_prefill,
    prefill_chunk, prefill_dtype), except return_logits."""
    if options.get("return_logits"):
        raise SubLLMError("generate returns tokens; use stream_generate(..., return_logits=True) for logits")
    steps = list(stream_generate(model, input_ids, attention_mask, **options))
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, 1)], 1)


# ---- text -------------------------------------------------------------------------------------


class TextDeltas:
    """Token ids -> text deltas per row, never emitting half of a multi-byte character (a decode
    that ends in U+FFFD is held back until the next token completes it)."""

    def __init__(self, tokenizer, batch_size: int = 1, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.text = [""] * batch_size

    def push(self, tokens) -> list[str]:
        out = []
        for b, t in enumerate(tokens.tolist() if isinstance(tokens, Tensor) else tokens):
            self.ids[b].append(int(t))
            out.append(self._delta(b, final=False))
        return out

    def flush(self) -> list[str]:
        return [self._delta(b, final=True) for b in range(len(self.ids))]

    def _delta(self, b: int, final: bool) -> str:
        text = self.tokenizer.decode(self.ids[b], skip_special_tokens=self.skip)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[len(self.text[b]) :] if text.startswith(self.text[b]) else text
        self.text[b] = text
        return delta


def stream_text(model: SubLLM, tokenizer, prompt_ids: Tensor, **kwargs) -> Iterator[str]:
    """Text deltas of one prompt (prompt_ids (1, T)); keyword arguments as `stream_generate`
    (eos_token_id defaults to the tokenizer's)."""
    kwargs.setdefault("eos_token_id", getattr(tokenizer, "eos_token_id", None))
    deltas = TextDeltas(tokenizer, prompt_ids.shape[0])
    for tokens in stream_generate(model, prompt_ids, **kwargs):
        d = deltas.push(tokens)[0]
        if d:
            yield d
    tail = deltas.flush()[0]
    if tail:
        yield tail


__all__ = [
    "generate",
    "stream_generate",
    "stream_text",
    "TextDeltas",
    "next_tokens",
    "apply_top_k",
    "apply_top_p",
    "apply_repetition_penalty",
    "validate_sampling",
]
