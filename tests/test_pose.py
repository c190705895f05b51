"""Position ids as an input (HF's convention) through every nesting level and the HF wrapper, and
PoSE training (subllm/trainer/pose.py): increasing positions spanning up to the target, the default
path unchanged bit for bit, exact resume with PoSE."""

import pytest
import torch
from helpers import crash_while_logging, pack_synthetic, tiny_model

from subllm import SubLLM, SubLLMError
from subllm.model.layers import rope_cos_sin
from subllm.trainer.config import build_config
from subllm.trainer.loop import train
from subllm.trainer.metrics import read_metrics
from subllm.trainer.pose import pose_generator, pose_position_ids


def test_pose_positions_increase_and_span_the_target():
    T, N = 48, 400
    seen_max, gaps = 0, 0
    for step in range(40):
        pos = pose_position_ids(4, T, N, pose_generator(0, 0, step, 0))
        assert pos.shape == (4, T) and pos.dtype == torch.long
        d = pos.diff(dim=1)
        assert (d >= 1).all() and (pos[:, 0] == 0).all() and (pos[:, -1] <= N - 1).all()
        assert ((d > 1).sum(1) <= 1).all()  # two chunks: at most one skip per row
        gaps += int((d > 1).sum())
        seen_max = max(seen_max, int(pos[:, -1].max()))
    assert seen_max > 0.9 * N and gaps > 100  # distances up to ~N really occur
    assert torch.equal(pose_position_ids(4, T, T, pose_generator(0, 0, 0, 0)), torch.arange(T).expand(4, T))
    # a pure function of (seed, rank, step, micro): the same draw again, another one elsewhere
    a = pose_position_ids(4, T, N, pose_generator(3, 1, 7, 0))
    assert torch.equal(a, pose_position_ids(4, T, N, pose_generator(3, 1, 7, 0)))
    assert not torch.equal(a, pose_position_ids(4, T, N, pose_generator(3, 1, 8, 0)))
    with pytest.raises(SubLLMError, match="at least"):
        pose_position_ids(1, T, T - 1, pose_generator(0, 0, 0, 0))


def test_default_positions_are_bit_identical():
    """position_ids = arange (or the padded default) gives exactly the outputs of no position_ids,
    in eval mode and in a training-mode step (same seed: same coins)."""
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, position_ids=torch.arange(40).expand(2, 40)).logits)
    model.train().set_step(3)
    losses = []
    for kw in ({}, {"position_ids": torch.arange(40).expand(2, 40)}):
        torch.manual_seed(5)
        losses.append(model(ids, labels=ids, **kw).loss)
    assert torch.equal(losses[0], losses[1])


def test_given_positions_reach_every_level():
    """A token kept by both S rotates by the position it was GIVEN (composed index maps)."""
    model = tiny_model()
    T = 50
    pos = pose_position_ids(2, T, 300, pose_generator(1, 0, 0, 0))
    seen = []
    hook = model.layers[3].register_forward_pre_hook(lambda m, a: seen.append((a[1], a[2])))  # cos, sin
    with torch.no_grad():
        out = model(torch.randint(3, 97, (2, T)), position_ids=pos, return_selections=True)
    hook.remove()
    s0, s1 = out.selections
    inner = pos.gather(1, s0.idx).gather(1, s1.idx)  # layer 3 sits inside both S
    cos, sin = rope_cos_sin(inner, model.config.head_dim, model.config.rope_theta)
    assert torch.equal(seen[0][0], cos) and torch.equal(seen[0][1], sin)
    assert not torch.equal(inner, torch.arange(T).expand(2, T).gather(1, s0.idx).gather(1, s1.idx))


def test_position_ids_match_hf_llama_and_the_hf_wrapper():
    from transformers import LlamaConfig, LlamaForCausalLM

    from subllm.hf import SubLLMForCausalLM

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5000.0}
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters=rope,
    )
    torch.manual_seed(2)
    hf = LlamaForCausalLM(cfg).eval()
    model = SubLLM.from_hf_llama(hf).eval()
    ids = torch.randint(0, 101, (2, 40))
    pos = pose_position_ids(2, 40, 256, pose_generator(0, 0, 1, 0))
    with torch.no_grad():
        ours = model(ids, position_ids=pos).logits
        assert (hf(ids, position_ids=pos).logits - ours).abs().max() < 1e-4
        assert (model(ids).logits - ours).abs().max() > 1e-4  # the positions matter
        wrapped = SubLLMForCausalLM.from_subllm(tiny_model()).eval()
        sub = tiny_model()
        p = pos.clamp(max=255)
        assert torch.equal(wrapped(ids % 97, position_ids=p).logits, sub(ids % 97, position_ids=p).logits)
    with pytest.raises(SubLLMError, match="position_ids"):
        model(ids, position_ids=pos[:, :10])


WORDS = "the a king queen lord castle sword crown speak love night day river sea and or but".split()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return pack_synthetic(tmp_path_factory.mktemp("data"), WORDS, seed=0, n_train=800)


def _cfg(packed, out, **kw):
    base = dict(preset="subllm-tiny", data=str(packed), steps=8, batch_size=2, seq_len=32, eval_every=0,
                eval_batches=1, save_every=4, out=str(out), threads=1, progress=False,
                optimizer="adamw")  # fmt: skip
    return build_config({**base, **kw})


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_pose_training_resumes_exactly(packed, tmp_path, monkeypatch):
    quiet = dict(log=lambda *a, **k: None)
    train(_cfg(packed, tmp_path / "plain"), **quiet)
    train(_cfg(packed, tmp_path / "pose", pose_target=400), **quiet)
    plain, pose = _losses(tmp_path / "plain"), _losses(tmp_path / "pose")
    assert len(pose) == len(plain) == 8 and pose != plain  # PoSE really changes the run

    with crash_while_logging(monkeypatch, 6):
        train(_cfg(packed, tmp_path / "resumed", pose_target=400), **quiet)
    train(_cfg(packed, tmp_path / "resumed", pose_target=400), resume=True, **quiet)
    assert _losses(tmp_path / "resumed") == pose  # bit for bit
    with pytest.raises(SubLLMError, match="pose_target"):  # a trajectory setting: resume must agree
        train(_cfg(packed, tmp_path / "resumed", pose_target=300, steps=9), resume=True, **quiet)
    with pytest.raises(SubLLMError, match="max_seq_len"):
        train(_cfg(packed, tmp_path / "big", pose_target=4096), **quiet)
