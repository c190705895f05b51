"""PoSE (Zhu et al. 2023, "PoSE: Efficient Context Window Extension of LLMs via Positional Skip-wise
Training"): train at a short window while the model sees relative distances of a long one.

Each training row of T tokens is cut into N chunks (here N = 2, the paper's default) at a random
point; chunk i keeps its tokens contiguous but all its positions move up by a skipping bias u_i,
with u_0 = 0 and u_i drawn uniformly from {u_(i-1), ..., target - T} (so chunks never overlap and
the last position is at most target - 1). Every relative distance from 1 to target - 1 can occur;
the tokens themselves are unchanged. The positions go to `model(ids, position_ids=...)`, and every
nesting level rotates a kept token by its given position (docs/method.md section 6).

Randomness: a generator seeded from (seed, rank, step, micro-batch) - independent of the global RNG,
so a run without PoSE is unchanged bit for bit and a resumed run draws the same positions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from subllm.errors import SubLLMError

CHUNKS = 2


def pose_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch's positions (a pure function of its arguments)."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pose_position_ids(
    batch: int, seq_len: int, target: int, generator: torch.Generator, chunks: int = CHUNKS
) -> Tensor:
    """(batch, seq_len) long positions: strictly increasing per row, first 0, last <= target - 1."""
    if target < seq_len:
        raise SubLLMError(f"--pose-target ({target}) must be at least the training --seq-len ({seq_len})")
    if not 1 <= chunks <= seq_len:
        raise SubLLMError(f"PoSE needs 1 <= chunks <= seq_len, got {chunks}")
    t = torch.arange(seq_len)
    room = target - seq_len  # the total skip the positions may take
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq_len - 1, generator=generator)[: chunks - 1].sort().values + 1
        chunk = (t[:, None] >= cuts[None, :]).sum(1)  # (T,) chunk index of each token
        skips = [0]
        for _ in range(chunks - 1):  # u_i ~ U{u_(i-1), ..., room}
            lo = skips[-1]
            skips.append(lo + int(torch.randint(0, room - lo + 1, (1,), generator=generator)))
        rows.append(t + torch.tensor(skips)[chunk])
    return torch.stack(rows)


__all__ = ["pose_position_ids", "pose_generator", "CHUNKS"]
