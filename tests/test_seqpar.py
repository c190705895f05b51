"""Sequence parallelism (subllm/seqpar/, issue 23): the sharded training forward and backward equal
one process on the same batch - loss, every gradient, every S's selection and weights, the
threshold buffers, the logits - over gloo on CPU with 4 ranks in one sequence group and with 2
groups of 2 (sequence x data parallel), nested S, padded rows, GQA with kv heads repeated over
ranks, the paper's and the aligned selection rules, PoSE positions and activation checkpointing
(tests/seqpar_cases.py). Plus the layout alone, the one-rank slow path, the trainer under torchrun
and the one-line errors."""

import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_config
from seqpar_cases import ATTENTIONS, CASES, SEED, build, record, worker
from test_distributed import NO_BALANCER, _args, _losses, _single, _torchrun, packed  # noqa: F401

from subllm import SubLLM
from subllm.errors import SubLLMError
from subllm.seqpar import SeqGroup, check_supported, layout, sequence_groups, sp_forward
from subllm.seqpar.ring import block_backward, block_forward
from subllm.trainer.config import build_config

SP_SIZES = (4, 2)  # one world of 4 gloo ranks: 1 group x 4, then 2 groups x 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("seqpar")
    mp.spawn(worker, args=(4, _free_port(), str(d), SP_SIZES), nprocs=4)
    return d


def _reference(case: str, rows=slice(None)) -> dict:
    model, ids, mask, pos = build(case)
    ids, mask, pos = ids[rows], None if mask is None else mask[rows], None if pos is None else pos[rows]
    torch.manual_seed(SEED + 2)
    out = model(ids, attention_mask=mask, labels=ids, position_ids=pos, return_selections=True)
    out.loss.backward()
    return record(out, model)


def _close(a: dict, b: dict) -> None:
    assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5
    assert abs(float(a["lm_loss"]) - float(b["lm_loss"])) < 1e-5
    assert a["grads"].keys() == b["grads"].keys()
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga - gb).abs().max() < 1e-5, k
        assert (ga - gb).norm() <= 1e-4 * gb.norm() + 1e-12, k  # gradients near 0 compared relatively
    for k in b["buffers"]:
        assert torch.allclose(a["buffers"][k], b["buffers"][k], rtol=0, atol=1e-6), k


def _same_selections(a: list, b: list) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert torch.equal(sa["idx"], sb["idx"])
        assert (sa["valid"] is None) == (sb["valid"] is None)
        assert sa["valid"] is None or torch.equal(sa["valid"], sb["valid"])
        assert torch.equal(sa["n_kept"], sb["n_kept"])
        assert (sa["weight"] - sb["weight"]).abs().max() < 1e-6


@pytest.mark.parametrize("att", ATTENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_four_ranks_equal_one_process(ranks, case, att):
    ref = _reference(case)
    got = [torch.load(ranks / f"{case}-4-{att}-{r}.pt") for r in range(4)]
    for g in got:  # synchronised: every rank holds one process's gradient
        _close(g, ref)
        _same_selections(g["sels"], ref["sels"])
    logits = torch.cat([g["logits"] for g in got], 1)  # rank r holds the r-th quarter of every row
    assert (logits - ref["logits"]).abs().max() < 1e-5
    assert all(v >= 1.0 for v in got[0]["imbalance"])
    assert ref["sels"][0]["valid"] is not None or case != "nested_padded"  # the padded row is ragged


@pytest.mark.parametrize("att", ATTENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_by_two_ranks_equal_data_parallel_one_process(ranks, case, att):
    # ranks 0-1 share row 0, ranks 2-3 row 1; gradients averaged over the two groups (as DDP does)
    refs = [_reference(case, slice(d, d + 1)) for d in range(2)]
    got = [torch.load(ranks / f"{case}-2-{att}-{r}.pt") for r in range(4)]
    mean = {k: (refs[0]["grads"][k] + refs[1]["grads"][k]) / 2 for k in refs[0]["grads"]}
    for r, g in enumerate(got):
        ref = refs[r // 2]
        _close(g, {**ref, "grads": mean, "buffers": {}})
        _same_selections(g["sels"], ref["sels"])
    for d in range(2):
        logits = torch.cat([got[2 * d]["logits"], got[2 * d + 1]["logits"]], 1)
        assert (logits - refs[d]["logits"]).abs().max() < 1e-5


@pytest.mark.parametrize("att", ATTENTIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_one_rank_group_is_the_model(case, att):
    # the slow path of every collective (a group of one runs none): exactly SubLLM.forward
    model, ids, mask, pos = build(case)
    ref = _reference(case)
    torch.manual_seed(SEED + 2)
    out = sp_forward(model, ids, SeqGroup(), mask, ids, pos, return_selections=True, attention=att)
    out.loss.backward()
    _close(record(out, model), ref)
    _same_selections(record(out, model)["sels"], ref["sels"])


@pytest.mark.parametrize("causal", [False, True])
def test_ring_block_kernel_equals_plain_softmax(causal):
    # a ring block on CPU (torch's flash kernel, log-sum-exp in and out) against the plain softmax,
    # forward and the block's backward given the final output; a fully hidden query row stays finite
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(torch.rand(2, 1, 7, 7) < 0.3, -1e9)
    bias[..., 0] = 0.0  # every query sees key 0
    do = torch.randn_like(q)
    for b in (None, bias):
        o, lse = block_forward(q, k, v, b, causal)
        o2, lse2 = block_forward(q, k, v, b, causal, math_=True)
        assert (o - o2).abs().max() < 1e-12 and (lse - lse2).abs().max() < 1e-12
        grads = zip(
            block_backward(do, q, k, v, o, lse, b, causal),
            block_backward(do, q, k, v, o2, lse2, b, causal, True),
        )
        for g, g2 in grads:
            assert (g - g2).abs().max() < 1e-12
    bias[0, 0, 2] = -1e9
    for math_ in (False, True):
        assert all(torch.isfinite(t).all() for t in block_forward(q, k, v, bias, causal, math_))


def test_layout_places_each_kept_token_on_its_own_rank():
    # 3 simulated ranks, rows of 12: every rank holds exactly the kept tokens of its own shard, in
    # order; `order` and `inv` are inverse; padding slots get weight slot K
    torch.manual_seed(0)
    n, T, B = 3, 12, 4
    pos = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    kept = [torch.randperm(T)[:6].sort().values for _ in range(B)]
    kept[1] = torch.tensor([5, 6, 8, 9, 11, 0])  # a ragged row: 5 real slots, then one invalid
    idx = torch.stack(kept)
    sel_valid = torch.ones(B, 6, dtype=torch.bool)
    sel_valid[1, 5] = False
    for rank in range(n):
        parent = layout.root(pos, valid, n, rank)
        place, src, slot = layout.child(parent, idx, sel_valid, n, rank)
        for b in range(B):
            mine = [int(t) for t, ok in zip(idx[b], sel_valid[b]) if ok and rank * 4 <= t < (rank + 1) * 4]
            held = slot[b] < 6
            assert [rank * 4 + int(s) for s in src[b][held]] == mine
            assert int(place.per_rank[b, rank]) == len(mine)
            assert place.local_pos[b][held].tolist() == mine
        ok = sel_valid
        assert torch.equal(place.inv.gather(1, place.order)[ok], torch.arange(6).expand(B, 6)[ok])


def test_errors_are_one_line(packed, tmp_path):  # noqa: F811
    base = {"data": str(packed), "out": str(tmp_path), "sequence_parallel": "2"}
    with pytest.raises(SubLLMError, match="not divisible by --sequence-parallel 2"):
        build_config({**base, "seq_len": "33"})
    for flag in ("fsdp", "compile"):
        with pytest.raises(SubLLMError, match=f"does not support --{flag}"):
            build_config({**base, flag: "true"})
    assert build_config({**base, "sp_attention": "ring"}).sp_attention == "ring"
    with pytest.raises(SubLLMError, match="sp.attention"):
        build_config({**base, "sp_attention": "star"})
    with pytest.raises(SubLLMError, match="needs torchrun"):
        sequence_groups(2)
    with pytest.raises(SubLLMError, match="must divide n_heads"):
        check_supported(SubLLM(tiny_config(n_heads=4, n_kv_heads=4)), 3)
    check_supported(SubLLM(tiny_config(n_heads=4, n_kv_heads=4)), 3, attention="ring")  # ring: any heads
    with pytest.raises(SubLLMError, match="--sp-attention must be one of"):
        check_supported(SubLLM(tiny_config()), 2, attention="star")
    with pytest.raises(SubLLMError, match="MoD"):
        check_supported(SubLLM(tiny_config(structure="TMT")), 2)
    model = SubLLM(tiny_config()).eval()
    with pytest.raises(SubLLMError, match="training mode"):
        sp_forward(model, torch.zeros(1, 8, dtype=torch.long), SeqGroup())


def test_train_sequence_parallel_matches_one_process_and_resumes(packed, tmp_path):  # noqa: F811
    # the whole trainer: 2 ranks share each row; with the Balancer ON the losses still equal one
    # process's (its statistics are the whole sequence's), unlike DDP's per-rank statistics
    args = ["--dtype", "fp32", "--sequence-parallel", "2", "--save-every", "2"]
    _torchrun(_args(packed, tmp_path / "sp", 2, args))
    _single(_args(packed, tmp_path / "one", 2, ["--dtype", "fp32"]))
    sp, one = _losses(tmp_path / "sp"), _losses(tmp_path / "one")
    assert len(sp) == len(one) == 3
    assert max(abs(a - b) for a, b in zip(sp, one)) < 1e-5, (sp, one)
    a = SubLLM.from_pretrained(tmp_path / "sp").state_dict()
    b = SubLLM.from_pretrained(tmp_path / "one").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()) < 1e-4
    # a crash after the step-2 checkpoint: resuming gives the same step 3 and weights, bit for bit
    shutil.rmtree(tmp_path / "sp" / "checkpoints" / "step-00000003")
    _torchrun([*_args(packed, tmp_path / "sp", 2, args), "--resume"])
    assert _losses(tmp_path / "sp") == sp
    c = SubLLM.from_pretrained(tmp_path / "sp").state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
