"""Retrieval examples mixed into training (issue 11 item 4): `subllm train --retrieval-mix 0.25`.

That share of each micro-batch's rows is replaced by passkey / multi-query associative recall
examples of exactly the training window, built by subllm/evals/retrieval.py's generators (the same
templates the evaluation asks). Their filler prose comes from the run's TRAINING split (the first
`FILLER_TOKENS` tokens of its packed shards, document separators removed), never from the held-out
text `subllm eval` draws its filler from; the mqar keys are words of that same training text.

Per micro-batch: floor(share * B) rows, plus one more with probability of the fractional part, at
random rows; each row is a passkey (needle at a uniform random depth) or an mqar example (2 to 8
pairs, fewer when the window cannot hold them; a passkey if it cannot hold 2) with equal
probability. The loss is the ordinary LM loss over the whole row. Randomness comes from a
generator seeded from (seed, rank, step, micro-batch) only - the global RNG and the data sampler
are untouched - so a resumed run replaces the same rows with the same examples, and a run
without the mix is unchanged bit for bit.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from subllm.errors import SubLLMError
from subllm.evals.retrieval import mqar, passkey

FILLER_TOKENS = 200_000  # training-split tokens the filler is drawn from
MAX_PAIRS, MIN_PAIRS = 8, 2


class RetrievalMix:
    def __init__(self, train_dir: str | Path, tokenizer, share: float, seq_len: int, seed: int):
        from subllm.data.packing import TokenShards

        if not 0.0 < share <= 1.0:
            raise SubLLMError(f"--retrieval-mix must lie in (0, 1], got {share}")
        data = TokenShards(train_dir)
        parts, n = [], 0
        for s in data.shards:
            parts.append(np.asarray(s[: FILLER_TOKENS - n], dtype=np.int64))
            n += len(parts[-1])
            if n >= FILLER_TOKENS:
                break
        ids = np.concatenate(parts)
        eos = data.meta.get("eos_id")
        if eos is not None:
            ids = ids[ids != eos]
        self.filler = ids.tolist()
        text = tokenizer.decode(self.filler[:50_000])
        self.words = sorted({w for w in text.lower().split() if w.isalpha() and 3 <= len(w) <= 9})
        self.tok, self.share, self.seq_len, self.seed = tokenizer, share, seq_len, seed
        if len(self.words) < MIN_PAIRS:
            raise SubLLMError(f"--retrieval-mix: the training text of {train_dir} has too few distinct words")
        try:  # the window must hold at least a passkey example
            passkey(tokenizer, self.filler, seq_len, 0.5, random.Random(0))
        except SubLLMError:
            raise SubLLMError(
                f"--retrieval-mix: --seq-len {seq_len} is too short for a passkey example"
            ) from None

    def rng(self, rank: int, step: int, micro: int) -> random.Random:
        return random.Random(f"retrieval-mix-{self.seed}-{rank}-{step}-{micro}")

    def example(self, rng: random.Random) -> list[int]:
        if rng.random() < 0.5:
            return passkey(self.tok, self.filler, self.seq_len, rng.random(), rng).ids
        pairs = rng.randint(MIN_PAIRS, MAX_PAIRS)
        for p in range(pairs, MIN_PAIRS - 1, -1):  # fewer pairs when the window cannot hold them
            try:
                return mqar(self.tok, self.filler, self.seq_len, p, rng, self.words).ids
            except SubLLMError:
                continue
        return passkey(self.tok, self.filler, self.seq_len, rng.random(), rng).ids

    def apply(self, x: torch.Tensor, rank: int, step: int, micro: int) -> tuple[torch.Tensor, list[int]]:
        """x (B, T) -> (x with some rows replaced (a new tensor when any are), the replaced rows)."""
        B, T = x.shape
        if T != self.seq_len:
            raise SubLLMError(f"retrieval mix built for {self.seq_len} tokens, got a batch of {T}")
        rng = self.rng(rank, step, micro)
        whole = int(self.share * B)
        n = whole + (1 if rng.random() < self.share * B - whole else 0)
        rows = sorted(rng.sample(range(B), n))
        if not rows:
            return x, rows
        x = x.clone()
        for r in rows:
            x[r] = torch.tensor(self.example(rng), dtype=x.dtype)
        return x, rows


__all__ = ["RetrievalMix", "FILLER_TOKENS"]
