"""Log-probabilities for the completions API's `logprobs` and `echo` (OpenAI's legacy format:
tokens, token_logprobs, top_logprobs, text_offset).

Every log-probability is the raw model's: log_softmax of the logits at that position, before the
repetition penalty, temperature, top-k and top-p (vLLM's default), so a greedy token's logprob
equals the largest of its top_logprobs exactly (lm-eval's `is_greedy` check compares them).

Prompt tokens (echo) come from one full eval-mode forward of the prompt - the obviously-correct
path, not the KV cache - with the head applied `PROMPT_CHUNK` positions at a time so that memory
stays (chunk, V) whatever the prompt length. The first prompt token has no logprob (None), as in
OpenAI's format. Generated tokens take theirs from the logits the batcher samples from.
"""

from __future__ import annotations

import torch

PROMPT_CHUNK = 256

Tops = list[tuple[int, float]]  # (token id, logprob), most likely first


def _tops(logp: torch.Tensor, k: int) -> list[Tops]:
    """logp (n, V) -> the k most likely (id, logprob) per row."""
    if k == 0:
        return [[] for _ in range(logp.shape[0])]
    v, i = logp.topk(k, dim=-1)
    return [list(zip(ids, vals)) for ids, vals in zip(i.tolist(), v.tolist())]


@torch.no_grad()
def prompt_logprobs(model, ids: list[int], k: int) -> tuple[list[float | None], list[Tops | None]]:
    """log p(ids[t] | ids[:t]) for every prompt position (None for the first) and the top k there."""
    hidden = model(torch.tensor([ids]), return_hidden=True).hidden[0]  # (T, C)
    lps: list[float | None] = [None]
    tops: list[Tops | None] = [None]
    T = len(ids)
    for a in range(0, T - 1, PROMPT_CHUNK):
        b = min(a + PROMPT_CHUNK, T - 1)
        logp = torch.log_softmax(model.head(hidden[a:b]).float(), dim=-1)  # (b - a, V): predicts a+1 .. b
        target = torch.tensor(ids[a + 1 : b + 1])
        lps += logp.gather(1, target[:, None])[:, 0].tolist()
        tops += _tops(logp, k)
    return lps, tops


def step_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[list[float], list[Tops]]:
    """logits (1, V) float of one row, the token chosen there -> ([its logprob], [top k])."""
    logp = torch.log_softmax(logits, dim=-1)
    return [float(logp[0, token])], _tops(logp, k)


class LogprobRecord:
    """The tokens of one choice with their logprobs, turned into OpenAI's body at the end."""

    def __init__(self):
        self.ids: list[int] = []
        self.lps: list[float | None] = []
        self.tops: list[Tops | None] = []

    def extend(self, ids: list[int], lps: list, tops: list) -> None:
        self.ids += ids
        self.lps += lps
        self.tops += tops

    def body(self, tokenizer) -> dict:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}: each token as its own
        decoded text (special tokens included), and its offset in the concatenation of those texts
        (the choice's text, unless a token decodes differently alone: a split multi-byte character)."""
        names: dict[int, str] = {}

        def name(i: int) -> str:
            if i not in names:
                names[i] = tokenizer.decode([i], skip_special_tokens=False)
            return names[i]

        tokens = [name(i) for i in self.ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top = [None if t is None else {name(i): lp for i, lp in t} for t in self.tops]
        return {"tokens": tokens, "token_logprobs": self.lps, "top_logprobs": top, "text_offset": offsets}
