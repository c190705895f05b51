"""A request decodes to the same bits alone and in any batch on the native decode path: the dense
fp32 matmul (csrc/dense_matmul.cpp) sums each output in one order whatever the number of rows, the
decode attention splits a row's keys by its own length only. Checked for the kernel against a float64
reference, then whole decode steps of rows joined into one cache against each row decoded alone -
fp32 and bf16 K/V (whose rounding turns any difference upstream into a visible one), nested S modules
that keep different rows, int8 and int4 layers through the native kernels."""

import pytest
import torch
from helpers import left_padded, tiny_model

from subllm.inference import native
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype
from subllm.inference.quantize import quantize_

pytestmark = pytest.mark.skipif(not native.available("cpu"), reason="native kernels not built here")
needs_vnni = pytest.mark.skipif(not native.vnni_available(), reason="no AVX512-VNNI kernel on this CPU")


@pytest.mark.parametrize("N, K", [(64, 576), (37, 40), (5, 16), (130, 1536)])
def test_dense_matmul_rows_do_not_depend_on_the_batch(N, K):
    g = torch.Generator().manual_seed(N + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(9, K, generator=g)
    alone = torch.cat([native.dense_matmul(x[i : i + 1], w) for i in range(9)])
    torch.testing.assert_close(alone, (x.double() @ w.double().T).float(), atol=1e-4, rtol=1e-5)
    for M in range(2, 10):  # tiles of 4 rows: full tiles, a tail of 1-3, one partial tile
        assert torch.equal(native.dense_matmul(x[:M], w), alone[:M]), M
    assert torch.equal(native.dense_matmul(x[[5, 2]], w), alone[[5, 2]])
    assert native.dense_matmul(x[:0], w).shape == (0, N)
    with pytest.raises(RuntimeError, match="fp32"):
        native.dense_matmul(x, w.t())


HD64 = dict(dim=128, n_heads=2, n_kv_heads=1, seed=1)  # head_dim 64: the attention's AVX-512 path


@pytest.mark.parametrize(
    "quant, kv",
    [("none", "same"), ("none", "bf16"), pytest.param("int8", "bf16", marks=needs_vnni),
     pytest.param("int4", "same", marks=needs_vnni)],
)  # fmt: skip
def test_a_row_decodes_the_same_alone_and_in_a_batch(quant, kv):
    model = tiny_model("TT(T(TT)T)T", vocab_size=112, **HD64)  # a head of 16-row tiles
    if quant != "none":  # the native kernels: ATen's (int8 "cast", "packed") round by batch as well
        quantize_(model, quant, int8_kernel="native")
    set_kv_dtype(model, kv)
    lens = [23, 9, 17, 30, 5]
    ids, _ = left_padded(lens, vocab=model.config.vocab_size)
    prompts = [ids[b : b + 1, ids.shape[1] - n :] for b, n in enumerate(lens)]
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(3, model.config.vocab_size, (6, len(lens)), generator=g)  # teacher-forced
    with torch.no_grad():
        alone = []
        for b, p in enumerate(prompts):
            cache = new_cache(model, 1)
            prefill(model, p, None, cache)
            alone.append(torch.stack([decode_step(model, cache, steps[s, b : b + 1])[0] for s in range(6)]))
        batch = new_cache(model, 1, packed=True)
        prefill(model, prompts[0], None, batch)
        for p in prompts[1:]:  # rows join as serve's batcher adds them
            one = new_cache(model, 1, packed=True)
            prefill(model, p, None, one)
            batch.add_rows(one)
        together = torch.stack([decode_step(model, batch, steps[s]) for s in range(6)])  # (6, B, V)
    kept = [batch.length(1, b) for b in range(len(lens))]
    assert len(set(kept)) > 1, kept  # the S kept different numbers of tokens per row
    for b in range(len(lens)):
        assert torch.equal(together[:, b], alone[b]), b
