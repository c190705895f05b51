"""Chunked prefill (subllm/inference/chunked_prefill.py): the same logits, the same selection at every level
(cache lengths and original positions), the same keys and values and the same greedy continuation
as one-pass prefill - nested SUBLLM, padded batch of unequal prompts - and `--prefill-chunk`."""

import pytest
import torch
from helpers import checkpoint_with_tokenizer, left_padded, tiny_preset_model

from subllm import SubLLMError, generate
from subllm.inference.chunked_prefill import prefill_chunked
from subllm.inference.engine import new_cache, prefill
from subllm.inference.generation import stream_generate


@pytest.mark.parametrize("structure", ["TT(T(TT)T)T", "(T(T(T)))T", "T(TT)(T)(TT)T"])
@pytest.mark.parametrize("chunk, packed", [(1, False), (5, True), (16, False), (16, True)])
def test_chunked_prefill_equals_one_pass(structure, chunk, packed):
    """Against one pass into a one-buffer cache; the chunked cache in either layout (cache_rows.py)."""
    model = tiny_preset_model(structure)
    ids, mask = left_padded([37, 20, 29])
    with torch.no_grad():
        ref_cache, cache = new_cache(model, 3, packed=False), new_cache(model, 3, packed=packed)
        ref = prefill(model, ids, mask, ref_cache)
        got = prefill_chunked(model, ids, mask, cache, chunk)
    assert (got - ref).abs().max() < 1e-5
    assert cache.snapshot() == ref_cache.snapshot()  # every S kept the same tokens, per row
    for level in range(cache.n_levels):
        for b in range(3):
            assert torch.equal(cache.positions(level, b), ref_cache.positions(level, b))
    for layer, level in enumerate(cache.layer_level):
        for b in range(3):
            n = cache.length(level, b)
            for new, old in zip(cache.row_kv(layer, b), ref_cache.row_kv(layer, b)):
                assert (new[..., :n, :] - old[..., :n, :]).abs().max() < 1e-5
    fr = model(ids, mask).keep_fractions
    assert all(0.1 < f < 0.9 for f in fr), fr  # a real mix of kept and dropped tokens at every S


def test_chunked_prefill_generation_equals_unchunked():
    model = tiny_preset_model()
    ids, mask = left_padded([30, 11, 23])

    def run(**kw):
        out = list(stream_generate(model, ids, mask, max_new_tokens=10, return_logits=True, **kw))
        return torch.stack([t for t, _ in out], 1), torch.stack([lg for _, lg in out], 1)

    tok, lg = run()
    for chunk in (4, 7):
        tok_c, lg_c = run(prefill_chunk=chunk)
        assert torch.equal(tok_c, tok)
        assert (lg_c - lg).abs().max() < 1e-5
    assert torch.equal(generate(model, ids, mask, max_new_tokens=10, prefill_chunk=8)[:, ids.shape[1] :], tok)
    with pytest.raises(SubLLMError, match="prefill_chunk"):
        generate(model, ids, mask, prefill_chunk=0)


def test_cli_prefill_chunk(tmp_path, capsys):
    from subllm.cli import main

    checkpoint_with_tokenizer(tmp_path)
    base = ["generate", "--checkpoint", str(tmp_path), "--prompt", "hello world the cat sat on the mat"]
    assert main([*base, "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--max-new-tokens", "6", "--prefill-chunk", "3"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
    ],
)
def test_chunked_prefill_with_rope_scaling(scaling):
    """Past the original length: each chunk rotates by the scaled frequencies (dynamic: of the
    whole prompt's length, as one pass does)."""
    from helpers import tiny_model

    model = tiny_model(rope_scaling=scaling, seed=1)
    ids, mask = left_padded([40, 25], vocab=97)
    with torch.no_grad():
        ref_cache, cache = new_cache(model, 2), new_cache(model, 2)
        ref = prefill(model, ids, mask, ref_cache)
        got = prefill_chunked(model, ids, mask, cache, 6)
    assert (got - ref).abs().max() < 1e-5 and cache.snapshot() == ref_cache.snapshot()
    for layer, level in enumerate(cache.layer_level):
        n = cache.length(level, 0)
        got, want = cache.row_kv(layer, 0)[0], ref_cache.row_kv(layer, 0)[0]
        assert (got[..., :n, :] - want[..., :n, :]).abs().max() < 1e-5
