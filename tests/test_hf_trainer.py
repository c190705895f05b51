"""`transformers.Trainer` trains SubLLMForCausalLM with no extra user code: the schedules' step
is the number of optimizer steps so far (shared by gradient-accumulation micro-batches), survives
a Trainer checkpoint + resume, and a stale explicit step raises instead of passing silently."""

import pytest
import torch
from helpers import tiny_model

from subllm import SubLLMError

hf_mod = pytest.importorskip("subllm.hf")
pytest.importorskip("accelerate")


def _model(seed=0):
    return hf_mod.SubLLMForCausalLM.from_subllm(tiny_model(seed=seed)).train()


def _data(n=16, T=24):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, 97, (T,), generator=g)), "labels": ids} for _ in range(n)]


def _steps_seen(model) -> list:
    """The step each training forward ran with (read when the core SubLLM starts computing)."""
    seen = []
    model.embed.register_forward_pre_hook(lambda m, a: seen.append(model.subllm.step) if m.training else None)
    return seen


def _trainer(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, push_to_hub=False,
    )  # fmt: skip
    return Trainer(model=model, args=TrainingArguments(**{**args, **kw}), train_dataset=_data())


def test_trainer_trains_and_steps_follow_optimizer_steps(tmp_path):
    model = _model()
    seen = _steps_seen(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, tmp_path, max_steps=3)
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert seen == [0, 0, 1, 1, 2, 2]  # two micro-batches per optimizer step
    assert int(model.train_step) == 3 and model.subllm.step == 2  # 3 steps done; the last ran at 2
    changed = [
        k for k, v in model.state_dict().items() if k != "train_step" and not torch.equal(v, before[k])
    ]
    assert "subsamples.0.score.weight" in changed and "bypasses.1.scale" in changed


def test_trainer_resume_restores_the_step(tmp_path):
    first = _model()
    _trainer(first, tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file()
    second = _model(seed=1)  # different weights: the resume must load both weights and step
    seen = _steps_seen(second)
    _trainer(second, tmp_path, max_steps=3).train(resume_from_checkpoint=str(ckpt))
    assert seen == [2, 2]  # step index 2 = the third optimizer step, not a restart at 0


def test_folder_written_by_trainer_loads_with_step(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model()
    trainer = _trainer(model, tmp_path, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert int(back.train_step) == 2  # optimizer steps done: a resume continues at step 2
    assert back.subllm.config == model.subllm.config
    from subllm import SubLLM

    SubLLM.from_pretrained(tmp_path / "final")  # the plain loader ignores the step


def test_a_copy_counts_its_own_steps():
    import copy

    model = _model()
    ids = torch.randint(3, 97, (2, 16))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    twin = copy.deepcopy(model)  # one step done; the copy must continue from there on its own
    opt2 = torch.optim.SGD(twin.parameters(), lr=1e-2)
    twin(ids, labels=ids).loss.backward()
    assert twin.subllm.step == 1
    opt2.step()
    twin(ids, labels=ids)
    assert twin.subllm.step == 2 and int(twin.train_step) == 2
    assert model.steps.current == 1  # the original did not see the copy's optimizer


def test_counter_and_stale_explicit_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 97, (2, 16))
    steps = []
    for _ in range(3):  # a plain loop without set_step: the model counts optimizer steps
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            steps.append(model.subllm.step)
        opt.step()
        opt.zero_grad()
    assert steps == [0, 0, 1, 1, 2, 2]
    with torch.no_grad():  # evaluation forwards never count
        model(ids)
    model.set_step(7)  # explicit mode
    model(ids, labels=ids).loss.backward()
    assert model.subllm.step == 7
    opt.step()
    with pytest.raises(SubLLMError, match="since set_step\\(7\\) but the step was not advanced"):
        model(ids, labels=ids)
    model.set_step(8)
    model(ids, labels=ids)
    assert model.subllm.step == 8 and int(model.train_step) == 8


def test_a_saved_folder_loaded_by_automodel_trains(tmp_path):
    """A folder written by SubLLM.save_pretrained, loaded with AutoModelForCausalLM: its logits are
    the SubLLM's, and forward + backward + Trainer steps run (the core's step buffer used to stay on
    the meta device: "Cannot copy out of meta tensor")."""
    from transformers import AutoModelForCausalLM

    core = tiny_model(seed=3).eval()
    core.save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any(b.is_meta for b in [*model.buffers(), model.subllm.step_tensor])
    ids = torch.randint(3, 97, (2, 24))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, core(ids).logits)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.subsamples[0].score.weight.grad is not None
    model.zero_grad()
    trainer = _trainer(model, tmp_path / "out", max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and int(model.train_step) == 2


def test_a_loaded_step_counts_from_the_load_not_from_earlier_steps():
    """Loading train_step = 5 into a model that already took 2 optimizer steps resumes at step 5
    (not 5 + 2), then counts on from there."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 97, (2, 16))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert int(model.train_step) == 2
    state = model.state_dict()
    state["train_step"] = torch.tensor(5)
    model.load_state_dict(state)
    model(ids, labels=ids).loss.backward()
    assert model.subllm.step == 5
    opt.step()
    model(ids, labels=ids)
    assert model.subllm.step == 6 and int(model.train_step) == 6
