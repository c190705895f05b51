"""Huge-page memory for decoding (subllm/inference/hugepages.py): zeroed buffers, models placed on
it and K/V caches kept in it decode exactly as with ordinary memory. The tiny test models' buffers
are far below one huge page, so MIN_BYTES is lowered to 0 to take the mapped path."""

import pytest
import torch
from helpers import greedy_decode, tiny_preset_model
from test_cache_rows import join_and_leave

from subllm.inference import hugepages
from subllm.inference.quantize import apply_quantization


@pytest.fixture
def mapped(monkeypatch):
    if not hugepages.available():
        pytest.skip("no MADV_HUGEPAGE here")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)


def test_zeros_are_zeros_on_a_mapping_of_exactly_their_size(mapped):
    t = hugepages.zeros((3, 5, 7), torch.bfloat16)
    assert t.shape == (3, 5, 7) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert torch.equal(t, torch.zeros(3, 5, 7, dtype=torch.bfloat16))
    assert t.untyped_storage().nbytes() == 3 * 5 * 7 * 2  # the mapping, not an allocator's block
    t.fill_(1)
    assert t.sum().item() == 105


def test_small_or_disabled_falls_back_to_torch_zeros(monkeypatch):
    t = hugepages.zeros((4, 4), torch.float32)  # 64 bytes < MIN_BYTES
    assert torch.equal(t, torch.zeros(4, 4))
    monkeypatch.setenv("SUBLLM_HUGEPAGES", "0")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)
    assert not hugepages.available()
    model = tiny_preset_model()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    hugepages.place(model)  # a no-op
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_a_placed_model_decodes_exactly_as_before(mapped, quantize):
    model = apply_quantization(tiny_preset_model().eval(), quantize)
    ref, _ = greedy_decode(model, [9, 5], 6, subset_at=3)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hugepages.place(model)
    got, _ = greedy_decode(model, [9, 5], 6, subset_at=3)
    assert torch.equal(got, ref)
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
        assert v.data_ptr() % hugepages.ALIGN == 0, k
    if model.config.tie_embeddings:
        assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()  # still tied


def test_a_placed_model_still_trains(mapped):
    model = tiny_preset_model()
    hugepages.place(model).train()
    model.set_step(0)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cache_levels_on_mapped_memory_decode_as_ordinary_memory(mapped, monkeypatch):
    """Every K/V buffer of a level (of a row of it, where rows are stored apart: cache_rows.py) is a
    view into one mapping, grown, cut (keep_rows) and merged (add_rows) there; logits equal those
    with torch.zeros buffers."""
    model = tiny_preset_model()
    got, cache = greedy_decode(model, [11, 4, 7], 12, subset_at=5)
    assert cache.packed
    for level, layers in enumerate(cache.level_layers):
        for b in range(3):
            kvs = [cache.row_kv(i, b) for i in layers]
            assert len({t.untyped_storage().data_ptr() for kv in kvs for t in kv}) == 1, level
    for packed in (False, True):  # keep_rows / add_rows on mapped levels
        join_and_leave(packed)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1 << 62)
    ref, _ = greedy_decode(model, [11, 4, 7], 12, subset_at=5)
    assert torch.equal(got, ref)


def test_a_kernel_that_refuses_the_advice_still_gets_zeroed_memory(mapped, monkeypatch):
    import mmap

    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 12345)  # no such advice: madvise fails with EINVAL
    with pytest.raises(OSError):
        mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).madvise(mmap.MADV_HUGEPAGE)
    t = hugepages.zeros((8, 8), torch.float32)
    assert torch.equal(t, torch.zeros(8, 8))
