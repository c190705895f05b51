"""The decode roofline of `subllm bench infer` (subllm/bench/roofline.py): bytes per decoded token
against a hand count on a tiny config, the L3 size parser, and the report's roofline fraction."""

import pytest
import torch

from subllm import ModelConfig, SubLLM
from subllm.bench.roofline import _parse_size, buffer_bytes, decode_bytes, measure_bandwidth

MIB = 1 << 20


def tiny():
    # dim 8, 2 heads of 4, 1 KV head, ffn 16, vocab 10: levels 0 (layers 0, 2) and 1 (layer 1)
    cfg = ModelConfig(structure="T(T)T", vocab_size=10, dim=8, n_heads=2, n_kv_heads=1, ffn_dim=16)
    return SubLLM(cfg).eval()


# by hand, fp32 (4 bytes): a layer = attn_norm 8 + wqkv (8 + 2*4) x 8 = 128 + wo 64 + ffn_norm 8
# + w13 (2*16) x 8 = 256 + w2 16 x 8 = 128 -> 592 floats = 2368 bytes. S0 = score 8 + threshold 1
# floats + threshold_updates 1 int64 = 44 bytes, its bypass scale 8 floats = 32 bytes (S0 sits at
# level 0). Every step: final norm 8 floats + LM head 10 x 8 floats = 352 bytes; an embedding row
# 8 floats = 32 bytes per token. K + V of one token in one layer: 2 x 1 head x 4 x 4 bytes = 32.
LAYER, S0, STEP, ROW, KV = 2368, 44 + 32, 32 + 320, 32, 32


def test_bytes_per_token_by_hand_batch_1():
    model = tiny()
    # prompt: 5 tokens at level 0, 3 kept at level 1; step 1 keeps its token, step 2 drops it
    snaps = [[[5], [3]], [[6], [4]], [[7], [4]]]
    step1 = 2 * LAYER + S0 + LAYER + STEP + ROW + KV * (2 * 6 + 1 * 4)  # layers 0, 2 read 6 K/V; 1 reads 4
    step2 = 2 * LAYER + S0 + STEP + ROW + KV * (2 * 7)  # layer 1 is not read at all
    got = decode_bytes(model, snaps, KV)
    assert got["weights"] == LAYER + 2 * (2 * LAYER + S0 + STEP + ROW)
    assert got["kv"] == KV * (2 * 6 + 4 + 2 * 7)
    assert got["tokens"] == 2 and got["per_token"] == (step1 + step2) / 2


def test_bytes_per_token_by_hand_batch_2():
    """Weights are read once per step for the whole batch; K/V per row at its own length; a row
    that did not decode (finished) adds nothing."""
    model = tiny()
    snaps = [[[5, 9], [3, 2]], [[6, 10], [3, 3]], [[7, 10], [4, 3]]]
    # step 1: both rows decode, only row 1 reaches level 1; step 2: row 0 alone, and it keeps
    step1 = 2 * LAYER + S0 + LAYER + STEP + 2 * ROW + KV * (2 * (6 + 10) + 3)
    step2 = 2 * LAYER + S0 + LAYER + STEP + ROW + KV * (2 * 7 + 4)
    got = decode_bytes(model, snaps, KV)
    assert got["tokens"] == 3 and got["per_token"] == (step1 + step2) / 3
    assert decode_bytes(model, [snaps[0], snaps[0]], KV)["per_token"] == 0.0  # no step, no token


def test_counts_follow_the_stored_dtype():
    """bf16 weights and a bf16 cache read half the bytes (the count reads element sizes)."""
    model = tiny()
    snaps = [[[5], [3]], [[6], [4]], [[7], [4]]]
    fp32 = decode_bytes(model, snaps, KV)
    half = decode_bytes(model.to(torch.bfloat16), snaps, KV // 2)
    # all but threshold_updates (int64, 8 bytes, read in both steps) halves
    assert half["weights"] == (fp32["weights"] - 2 * 8) / 2 + 2 * 8 and half["kv"] == fp32["kv"] / 2


@pytest.mark.parametrize(
    "text, size",
    [("32768K\n", 32 * MIB), (" 32 MiB (1 instance)", 32 * MIB), ("480 MiB (2 instances)", 480 * MIB),
     ("1.5 GiB", 3 * (1 << 29)), ("none", None)],
)  # fmt: skip
def test_cache_size_parser(text, size):
    assert _parse_size(text) == size


def test_bandwidth_buffer_is_larger_than_l3():
    assert buffer_bytes(None) == buffer_bytes(32 * MIB) == 256 * MIB
    assert buffer_bytes(480 * MIB) == 960 * MIB and buffer_bytes(4096 * MIB) == 2048 * MIB
    bw = measure_bandwidth(reps=2, nbytes=4 * MIB)  # runs; its value is not asserted
    assert bw["buffer_bytes"] == 4 * MIB and bw["reps"] == 2
    assert bw["bytes_per_s"] > 0 and bw["bytes_per_s_4k"] > 0


def test_bench_report_roofline_is_bytes_times_speed_over_bandwidth(monkeypatch):
    import subllm.bench.infer as infer

    monkeypatch.setattr(infer, "measure_bandwidth", lambda: {
        "bytes_per_s": 1e9, "bytes_per_s_4k": 5e8, "huge_pages": True, "buffer_bytes": 1, "l3_bytes": None,
        "reps": 1, "best_s": 1.0, "threads": 1,
    })  # fmt: skip
    rep = infer.run_infer(
        "subllm-tiny", None, [32], [1], ["fp32"], 3, reps=1, warmup=0, bound=False, log=lambda *a: None
    )
    (r,) = rep["results"]
    assert rep["memory_bandwidth"]["bytes_per_s"] == 1e9
    for m in ("llama", "subllm"):
        read = r["decode_bytes_read"][m]
        assert read["tokens"] == 3
        assert r["decode_bytes_per_token"][m] == round((read["weights"] + read["kv"]) / 3)
        expect = (read["weights"] + read["kv"]) / 3 * r["decode_tok_s"][m] / 1e9
        assert r["decode_roofline"][m] == pytest.approx(expect, rel=1e-3)


def test_int8_weights_count_one_byte_plus_their_scales():
    """quantize_int8_: a layer's linears read 1 byte per weight + a scale per output channel (4 bytes
    for the cast kernel, 2 for the packed one; wqkv 16, wo 8, w13 32, w2 8 outputs); norms stay
    fp32; the head 10 x 8 int8 + 10 scales."""
    from subllm.inference.quantize import quantize_int8_

    snaps = [[[5], [3]], [[6], [4]], [[7], [4]]]
    for kernel, scale in (("cast", 4), ("packed", 2)):  # the packed kernel reads bf16 scales
        model = quantize_int8_(tiny(), int8_kernel=kernel)
        layer8 = (128 + 64 + 256 + 128) + scale * (16 + 8 + 32 + 8) + 4 * (8 + 8)  # 896 with fp32 scales
        step8 = 32 + (80 + scale * 10)  # final norm + int8 head
        got = decode_bytes(model, snaps, KV)
        assert got["weights"] == layer8 + 2 * (2 * layer8 + S0 + step8 + ROW)
        assert got["kv"] == KV * (2 * 6 + 4 + 2 * 7)
