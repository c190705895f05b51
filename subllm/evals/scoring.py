"""Batched log-likelihood scoring of token sequences with a SubLLM (eval mode: keep iff score > theta).

The one primitive under both the text loss / bits per byte and the lm-eval adapter: given token
lists `tokens` and a count `n`, score the last `n` tokens of each list conditioned on everything
before them. Sequences are sorted by length and right-padded within a batch (the attention mask
hides the pads: they never attend, are never attended to, and never compete in an S); identical
inputs (e.g. the four one-token answers of a multiple-choice question share one context) run once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from subllm.dtype import autocast
from subllm.errors import SubLLMError


@dataclass
class Score:
    logprob: float  # sum of log p over the scored tokens (nats)
    greedy: bool  # every scored token is the argmax
    n: int  # tokens scored


@dataclass
class KeepStats:
    """Realised eval-mode keep fractions per S, averaged over sequences (token-weighted)."""

    sums: list[float] = field(default_factory=list)
    tokens: float = 0.0

    def add(self, fractions: list[float], n_tokens: int) -> None:
        if not self.sums:
            self.sums = [0.0] * len(fractions)
        for i, f in enumerate(fractions):
            self.sums[i] += f * n_tokens
        self.tokens += n_tokens

    def fractions(self) -> list[float]:
        return [s / self.tokens for s in self.sums] if self.tokens else []


def autocast_context(dtype: str, device: torch.device):
    if dtype not in ("float32", "bfloat16"):
        raise SubLLMError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return autocast(dtype, device)


@torch.no_grad()
def score_tokens(
    model,
    items: list[tuple[list[int], int]],
    batch_size: int = 8,
    max_tokens_per_batch: int | None = None,
    dtype: str = "float32",
    keep_stats: KeepStats | None = None,
    pad_id: int | None = None,
) -> list[Score]:
    """items: (tokens, n) with 1 <= n < len(tokens) <= max_seq_len + 1. Returns one Score per item.

    The model input is tokens[:-1]; the targets are tokens[1:]; the last n targets are scored.
    """
    if model.training:
        raise SubLLMError("scoring needs the model in eval mode (call model.eval())")
    max_len = model.config.max_seq_len
    device = model.embed.weight.device
    pad = model.config.pad_token_id if pad_id is None else pad_id
    groups: dict[tuple, list[int]] = {}  # model input -> indexes of the items that share it
    for i, (toks, n) in enumerate(items):
        if not 1 <= n < len(toks):
            raise SubLLMError(f"item {i}: need 1 <= n ({n}) < len(tokens) ({len(toks)})")
        if len(toks) - 1 > max_len:
            raise SubLLMError(f"item {i}: {len(toks) - 1} input tokens exceed max_seq_len {max_len}")
        groups.setdefault(tuple(toks[:-1]), []).append(i)
    inputs = sorted(groups, key=len, reverse=True)  # longest first: the first batch shows any OOM
    out: list[Score | None] = [None] * len(items)
    budget = max_tokens_per_batch or batch_size * max(len(inputs[0]) if inputs else 1, 1)
    start = 0
    while start < len(inputs):
        width = len(inputs[start])
        n_rows = max(1, min(batch_size, budget // max(width, 1)))
        batch = inputs[start : start + n_rows]
        start += len(batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast_context(dtype, device):
            res = model(ids, attention_mask=mask)
        logp = torch.log_softmax(res.logits.float(), dim=-1)  # (B, W, V)
        if keep_stats is not None and len(res.keep_fractions):
            keep_stats.add(res.keep_fractions.tolist(), int(mask.sum()))
        for r, inp in enumerate(batch):
            L = len(inp)
            for i in groups[inp]:
                toks, n = items[i]
                tgt = torch.tensor(toks[L - n + 1 : L + 1], device=device)  # the last n tokens
                lp = logp[r, L - n : L]  # (n, V): predictions for them
                picked = lp.gather(1, tgt[:, None])[:, 0]
                out[i] = Score(float(picked.sum()), bool((lp.argmax(-1) == tgt).all()), n)
    return out  # type: ignore[return-value]


def rolling_windows(tokens: list[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], int]]:
    """Score every token of `tokens` exactly once with sliding windows of `window` input tokens.

    The sequence is [prefix] + tokens; each window after the first advances by `stride` and scores
    only its new tokens, which see at least window - stride tokens of context. Returns score_tokens
    items (window tokens + 1 target, number of tokens to score)."""
    if not 1 <= stride <= window:
        raise SubLLMError(f"stride must lie in [1, window={window}], got {stride}")
    seq = [prefix, *tokens]
    items, done, begin = [], 0, 0  # done: targets (= seq[1:] = tokens) already scored
    while done < len(tokens):
        end = min(begin + window, len(tokens))  # score targets tokens[done:end]
        b = max(0, end - window)  # a full-width window where possible (more context for the tail)
        items.append((seq[b : end + 1], end - done))
        done, begin = end, begin + stride
    return items
