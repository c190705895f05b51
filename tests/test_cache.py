"""KVCache + engine (prefill / decode_step) against the eval-mode full forward: per-row lengths and
original positions at every level, dropped rows skip inner layers, all-dropped / all-kept decode,
no row ever sees another row's tokens, growth and byte counts."""

import pytest
import torch
from helpers import left_padded, tiny_preset_model

from subllm import KVCache
from subllm.config import iter_subs, parse_structure
from subllm.inference.cache import layer_levels
from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.model.subllm import SubLLM

V = 256


def run(model, ids, mask, steps, seed=2, columns=None):
    """Prefill + `steps` teacher-forced random tokens (row b feeds column columns[b] of a fixed
    table, so a row run alone can feed what it fed in a batch) -> cache, sequence, mask, logits."""
    B = ids.shape[0]
    table = torch.randint(3, V, (steps, 8), generator=torch.Generator().manual_seed(seed))
    table = table[:, list(range(B)) if columns is None else columns]
    mask = torch.ones_like(ids) if mask is None else mask
    cache = new_cache(model, B, chunk=8)
    logits = [prefill(model, ids, mask, cache)]
    seq, m = ids, mask
    for tok in table:
        seq, m = torch.cat([seq, tok[:, None]], 1), torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
        logits.append(decode_step(model, cache, tok))
    return cache, seq, m, logits


@pytest.mark.parametrize("subset", [False, True])  # inner levels for the whole batch / the kept rows only
@pytest.mark.parametrize("structure", ["TT(T(TT)T)T", "T(T)T(TT)T", "(T(T(T)))"])
@torch.no_grad()
def test_lengths_positions_and_logits_match_full_forward(structure, subset):
    model = tiny_preset_model(structure)
    model.decode_subset = subset
    ids, mask = left_padded([13, 20, 7])
    B, steps = 3, 12
    prefilled = run(model, ids, mask, 0)[0]
    cache, seq, m, logits = run(model, ids, mask, steps)
    # reference: the full forward over every token fed so far
    out = model(seq, m, return_selections=True)
    T0 = ids.shape[1]
    for t, lg in enumerate(logits):
        assert (lg - out.logits[:, T0 - 1 + t]).abs().max() < 1e-5, t
    assert cache.lengths(0).tolist() == m.sum(1).tolist()
    # original positions per level: compose the index maps of the full forward's selections
    level_pos = {0: (m.cumsum(1) - 1).clamp(min=0)}
    for sub in iter_subs(parse_structure(structure)):
        sel = out.selections[sub.index]
        level = sub.index + 1
        level_pos[level] = level_pos[_parent_level(structure, sub.index)].gather(1, sel.idx)
        kept = sel.n_kept.tolist()
        assert cache.lengths(level).tolist() == kept  # exactly the tokens S kept, per row
        for b in range(B):
            assert torch.equal(cache.positions(level, b), level_pos[level][b, : kept[b]])
        # a real mix of kept and dropped tokens at every level, in prefill and in decode
        assert 0 < sum(prefilled.lengths(level).tolist()) < int(sel.n_real.sum())
        new = sum(kept) - sum(prefilled.lengths(level).tolist())
        assert (
            0
            < new
            < int(sel.n_real.sum()) - sum(prefilled.lengths(_parent_level(structure, sub.index)).tolist())
        )


def _parent_level(structure, sub_index):
    for s in iter_subs(parse_structure(structure)):
        if any(not isinstance(c, int) and c.index == sub_index for c in s.children):
            return s.index + 1
    return 0


@pytest.mark.parametrize("subset", [False, True])
@torch.no_grad()
def test_dropped_rows_skip_inner_layers_and_leave_caches_untouched(subset):
    """Subset path (the CPU default): only the rows that kept the token run an inner layer. Whole
    batch (the CUDA default): every row runs it in one call while any row kept the token. Either
    way a dropped row's cache is untouched up to its length and does not grow."""
    model = tiny_preset_model()
    model.decode_subset = subset
    model.native_layers = False  # layers called one by one (the hooks count them); runs of layers
    # in one native call leave the same caches: tests/test_native_layers.py
    ids, mask = left_padded([11, 16, 9, 14])
    cache = new_cache(model, 4)
    prefill(model, ids, mask, cache)
    calls = []
    inner = [i for i, lv in enumerate(cache.layer_level) if lv > 0]
    hooks = [
        model.layers[i].attn_norm.register_forward_hook(lambda m, a, o, i=i: calls.append((i, a[0].shape[0])))
        for i in inner
    ]
    g = torch.Generator().manual_seed(3)
    saw_mix = False
    for _ in range(10):
        before = cache.snapshot()
        kv = {i: [cache.row_kv(i, b)[0].clone() for b in range(4)] for i in inner}
        calls.clear()
        decode_step(model, cache, torch.randint(3, V, (4,), generator=g))
        after = cache.snapshot()
        for level in range(1, cache.n_levels):
            grew = [a - b_ for a, b_ in zip(after[level], before[level])]
            assert set(grew) <= {0, 1}
            saw_mix |= 0 < sum(grew) < 4
            for i in cache.level_layers[level]:
                ran = [n for j, n in calls if j == i]
                # no call at all when no row kept the token
                assert ran == (([sum(grew)] if subset else [4]) if sum(grew) else [])
                for b in range(4):
                    if not grew[b]:  # dropped: this row's cache is bit-for-bit untouched
                        n = before[level][b]
                        assert torch.equal(cache.row_kv(i, b)[0][..., :n, :], kv[i][b][..., :n, :])
    for h in hooks:
        h.remove()
    assert saw_mix


@torch.no_grad()
def test_all_dropped_decode():
    model = tiny_preset_model()
    for s in model.subsamples:
        s.score.weight.zero_()  # score 0 everywhere: nothing is kept (keep iff score > 0)
    ids, mask = left_padded([9, 5])
    cache, seq, m, logits = run(model, ids, mask, 6)
    assert all(n == 0 for level in range(1, cache.n_levels) for n in cache.lengths(level).tolist())
    ref = model(seq, m).logits
    for t, lg in enumerate(logits):
        assert (lg - ref[:, ids.shape[1] - 1 + t]).abs().max() < 1e-5


@torch.no_grad()
def test_all_kept_with_unit_bypass_is_llama():
    model = tiny_preset_model()
    with torch.no_grad():
        model.embed.weight[:, 0] += 5.0  # one shared coordinate, far larger than anything else
        for s in model.subsamples:
            s.score.weight.zero_()
            s.score.weight[0, 0] = 1.0  # score ~ 5 > 1 for every token: all kept, weight 1
        for b in model.bypasses:
            b.scale.fill_(1.0)  # z = x + 1 * (h - x) = h: SUBLLM becomes the plain stack
    llama = SubLLM(model.config.as_llama()).eval()
    llama.load_state_dict(model.state_dict(), strict=False)
    ids, mask = left_padded([10, 4, 7])
    cache, seq, m, logits = run(model, ids, mask, 6)
    for level in range(cache.n_levels):
        assert cache.lengths(level).tolist() == m.sum(1).tolist()  # every token reaches every level
    ref = llama(seq, m).logits
    for t, lg in enumerate(logits):
        assert (lg - ref[:, ids.shape[1] - 1 + t]).abs().max() < 1e-5


@torch.no_grad()
def test_rows_never_see_each_other():
    model = tiny_preset_model()
    ids, mask = left_padded([12, 8])
    cache_a, _, _, la = run(model, ids, mask, 5)
    ids2 = ids.clone()
    ids2[1, mask[1].bool()] = torch.randint(3, V, (8,))  # change row 1 only
    _, _, _, lb = run(model, ids2, mask, 5)
    for a, b in zip(la, lb):
        assert (a[0] - b[0]).abs().max() < 1e-6
    # alone, row 0 gives the same as in the batch
    cache_c, _, _, lc = run(model, ids[:1, -12:], None, 5)
    for a, c in zip(la, lc):
        assert (a[0] - c[0]).abs().max() < 1e-5
    for level in range(cache_a.n_levels):
        assert cache_a.length(level, 0) == cache_c.length(level, 0)


@torch.no_grad()
def test_left_and_right_padding_agree():
    model = tiny_preset_model()
    ids, mask = left_padded([6, 15, 10])
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for b in range(3):
        n = int(mask[b].sum())
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    _, _, _, la = run(model, ids, mask, 4)
    _, _, _, lb = run(model, right_ids, right_mask, 4)
    for a, b in zip(la, lb):
        assert (a - b).abs().max() < 1e-6


def test_layer_levels():
    assert layer_levels(parse_structure("TT(T(TT)T)T")) == ([0, 0, 1, 2, 2, 1, 0], 3)
    assert layer_levels(parse_structure("T(T)T(TT)T")) == ([0, 1, 0, 2, 2, 0], 3)
    assert layer_levels(parse_structure("TTT")) == ([0, 0, 0], 1)


@torch.no_grad()
def test_growth_bytes_and_rewind():
    model = tiny_preset_model()
    cfg = model.config
    ids, mask = left_padded([5, 3])
    cache, seq, m, _ = run(model, ids, mask, 10)  # chunk 8: level 0 grows 8 -> 16
    assert cache.capacity[0] == 16 and all(c % 8 == 0 for c in cache.capacity)
    per_tok = 2 * cfg.n_kv_heads * cfg.head_dim * 4
    held = sum(sum(cache.lengths(cache.layer_level[i]).tolist()) for i in range(cfg.n_layers))
    assert cache.nbytes() == per_tok * held
    assert cache.capacity_nbytes() == sum(
        2 * 2 * cfg.n_kv_heads * cache.capacity[lv] * cfg.head_dim * 4 for lv in cache.layer_level
    )
    snap = cache.snapshot()
    decode_step(model, cache, torch.tensor([5, 6]))
    assert cache.lengths(0).tolist() == [16, 14]
    cache.rewind(snap)
    assert cache.snapshot() == snap
    assert (cache.pos[0][1, 13:] == -1).all()
    # preallocation: one allocation at prefill, no growth during decode
    pre = new_cache(model, 2, chunk=64)
    prefill(model, ids, mask, pre, extra=4)
    cap = list(pre.capacity)
    assert cap[0] == 5 + 4  # exactly prompt + extra, not rounded to the chunk
    for _ in range(4):
        decode_step(model, pre, torch.tensor([7, 8]))
    assert pre.capacity == cap


@torch.no_grad()
def test_subset_rows_decode_and_validation():
    model = tiny_preset_model()
    ids, mask = left_padded([7, 9, 4])
    cache = new_cache(model, 3)
    prefill(model, ids, mask, cache)
    ref = new_cache(model, 1)
    prefill(model, ids[1:2, -9:], None, ref)
    a = decode_step(model, cache, torch.tensor([42]), rows=[1])  # rows 0 and 2 are left alone
    b = decode_step(model, ref, torch.tensor([42]))
    assert (a - b).abs().max() < 1e-5
    assert cache.lengths(0).tolist() == [7, 10, 4]
    from subllm import SubLLMError

    with pytest.raises(SubLLMError, match="increasing"):
        decode_step(model, cache, torch.tensor([1, 2]), rows=[2, 0])
    with pytest.raises(SubLLMError, match="eval mode"):
        decode_step(model.train(), cache, torch.tensor([1, 2, 3]))
    model.eval()
    with pytest.raises(SubLLMError, match="batch_size"):
        KVCache(model.config, 0)
    # a cache can be prefilled again: nothing of the first prompt survives, even at levels the
    # second prompt never reaches (here: nothing is kept at all)
    for s in model.subsamples:
        s.score.weight.zero_()
    prefill(model, ids, mask, cache)
    assert cache.snapshot() == [[7, 9, 4], [0, 0, 0], [0, 0, 0]]


def test_bf16_autocast_cache():
    model = tiny_preset_model()
    ids, mask = left_padded([9, 6])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = new_cache(model, 2)
        lg = prefill(model, ids, mask, cache)
        lg2 = decode_step(model, cache, torch.tensor([4, 5]))
    assert cache.dtype == torch.bfloat16 and cache.row_kv(0, 0)[0].dtype == torch.bfloat16
    assert torch.isfinite(lg).all() and torch.isfinite(lg2).all()
    assert cache.nbytes() == cache.bytes_per_token() * sum(
        sum(cache.lengths(lv).tolist()) for lv in cache.layer_level
    )


@torch.no_grad()
def test_allocated_kv_bytes_against_the_ideal_ratio():
    """Allocated K/V bytes, measured from torch's storages (not from the cache's counters), equal
    bytes per token x (tokens each layer's level kept in an eval forward + the reserved decode
    slots); for SUBLLM vs the same-size LLaMA that ratio lies at or above the ideal (held-entry)
    ratio, above it only by the reserved decode slots."""
    model = tiny_preset_model()
    llama = SubLLM(model.config.as_llama()).eval()
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    sels = model(ids, return_selections=True).selections
    kept = {0: 48}  # tokens per level, counted from the selections alone
    for sub in iter_subs(model.config.tree):
        kept[len(kept)] = int(sels[sub.index].n_kept[0])
    assert 0 < kept[2] < kept[1] < 48
    D = 5
    alloc, held = {}, {}
    for name, m in (("subllm", model), ("llama", llama)):
        cache = new_cache(m, 1)
        prefill(m, ids, None, cache, extra=D)
        per_tok = cache.bytes_per_token()
        levels = cache.layer_level
        assert cache.allocated_nbytes() == per_tok * sum(kept[lv] + D for lv in levels)
        alloc[name], held[name] = cache.allocated_nbytes(), cache.nbytes()
        assert held[name] == per_tok * sum(kept[lv] for lv in levels)
    n_layers = model.config.n_layers
    ideal = held["subllm"] / held["llama"]
    measured = alloc["subllm"] / alloc["llama"]
    assert ideal == sum(kept[lv] for lv in layer_levels(model.config.tree)[0]) / (n_layers * 48)
    assert ideal < measured < (ideal * n_layers * 48 + n_layers * D) / (n_layers * 48)


def test_allocated_bytes_see_a_view_into_a_larger_buffer():
    cache = KVCache(tiny_preset_model().config, 1)
    big = torch.zeros(1, cache.config.n_kv_heads, 100, cache.config.head_dim)
    cache.k[0] = big[:, :, :10]  # a view: its shape says 10 slots, its storage holds 100
    assert cache.allocated_nbytes() - cache.capacity_nbytes() == 90 * cache.bytes_per_token() // 2
