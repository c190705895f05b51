"""KVCache row operations for continuous batching: rows prefilled alone and merged (`add_rows`),
finished rows dropped (`keep_rows`), and every row still decodes exactly as it does alone."""

import pytest
import torch
from helpers import tiny_preset_model

from subllm import SubLLMError
from subllm.inference.engine import decode_step, new_cache, prefill

V = 256


def alone(model, prompt, feed):
    """Prefill `prompt` alone, then decode the tokens `feed`: -> logits per step, final cache."""
    cache = new_cache(model, 1, chunk=8)
    out = [prefill(model, torch.tensor([prompt]), None, cache)[0]]
    for t in feed:
        out.append(decode_step(model, cache, torch.tensor([t]))[0])
    return out, cache


@torch.no_grad()
@pytest.mark.parametrize("packed", [False, True])
def test_rows_join_and_leave_a_running_batch(packed):
    """Either layout: rows in one buffer per layer (KVCache) or stored apart (cache_rows.py)."""
    join_and_leave(packed)


@torch.no_grad()
def join_and_leave(packed):
    model = tiny_preset_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (11, 4, 19, 7)]
    feeds = [torch.randint(3, V, (12,), generator=g).tolist() for _ in prompts]
    ref = [alone(model, p, f) for p, f in zip(prompts, feeds)]

    # rows 0, 1 start together; row 2 joins after 3 steps; row 1 leaves after 5; row 3 joins then
    batch, rows, step = None, [], {}
    for t in range(12):
        joining = {0: [0, 1], 3: [2], 5: [3]}.get(t, [])
        for r in joining:
            c = new_cache(model, 1, chunk=8, packed=packed)
            got = prefill(model, torch.tensor([prompts[r]]), None, c)[0]
            assert torch.equal(got, ref[r][0][0])  # prefill is the same call as alone
            if batch is None:
                batch = c
            else:
                assert batch.add_rows(c) == [len(rows)]
            rows.append(r)
            step[r] = 0
        if t == 5:
            i = rows.index(1)
            batch.keep_rows([j for j in range(len(rows)) if j != i])
            rows.remove(1)
        tokens = torch.tensor([feeds[r][step[r]] for r in rows])
        logits = decode_step(model, batch, tokens)
        for i, r in enumerate(rows):
            step[r] += 1
            assert (logits[i] - ref[r][0][step[r]]).abs().max() < 1e-5, (t, r)
    for i, r in enumerate(rows):  # per-level lengths and original positions equal the row alone's
        c = ref[r][1]
        n = step[r]
        for level in range(c.n_levels):
            upto = [p for p in c.positions(level, 0).tolist() if p < len(prompts[r]) + n]
            assert batch.positions(level, i).tolist() == upto
    assert batch.batch_size == 3 and batch.nbytes() > 0


@torch.no_grad()
def test_keep_rows_follows_the_requested_order():
    """keep_rows([2, 0]): row 0 of the result is old row 2 and row 1 old row 0 (not ascending), so
    each decodes exactly as it does alone, and holds that row's lengths and positions per level."""
    model = tiny_preset_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (9, 14, 5)]
    feeds = [torch.randint(3, V, (4,), generator=g).tolist() for _ in prompts]
    ref = [alone(model, p, f) for p, f in zip(prompts, feeds)]
    batch = new_cache(model, 1, chunk=8)
    prefill(model, torch.tensor([prompts[0]]), None, batch)
    for p in prompts[1:]:
        c = new_cache(model, 1, chunk=8)
        prefill(model, torch.tensor([p]), None, c)
        batch.add_rows(c)
    order = [2, 0]
    batch.keep_rows(order)
    for t in range(4):
        logits = decode_step(model, batch, torch.tensor([feeds[r][t] for r in order]))
        for i, r in enumerate(order):
            assert (logits[i] - ref[r][0][t + 1]).abs().max() < 1e-5, (t, r)
    for i, r in enumerate(order):
        for level in range(batch.n_levels):
            assert batch.positions(level, i).tolist() == ref[r][1].positions(level, 0).tolist()


@torch.no_grad()
def test_keep_rows_frees_memory_and_checks_arguments():
    model = tiny_preset_model()
    caches = []
    for n in (300, 5):
        c = new_cache(model, 1, chunk=16)
        prefill(model, torch.randint(3, V, (1, n)), None, c)
        caches.append(c)
    batch = caches[0]
    batch.add_rows(caches[1])
    big = batch.capacity_nbytes()
    batch.keep_rows([1])  # the long row leaves: capacity shrinks to the short row's
    assert batch.batch_size == 1 and batch.capacity_nbytes() < big / 10
    assert batch.length(0, 0) == 5 and batch.capacity[0] == 16
    with pytest.raises(SubLLMError, match="at least one row"):
        batch.keep_rows([])
    with pytest.raises(SubLLMError, match="distinct"):
        batch.keep_rows([0, 0])
    other = new_cache(tiny_preset_model("TTT(T)"), 1)
    with pytest.raises(SubLLMError, match="same model config"):
        batch.add_rows(other)
