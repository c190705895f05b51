"""torch.compile of the training step (issue 10): one graph, no breaks, no recompilation from step
to step, the same numbers as eager; the pieces that make it possible (schedules as tensors, the
Balancer's gradient written out) against their obviously-correct forms."""

import pytest
import torch
from helpers import tiny_config

from subllm import SubLLM, SubLLMError
from subllm.model.scaling import ScheduledFloat, _mean_limit, limit_violation_grad, violation_loss
from subllm.trainer.compiled import check_compilable, compile_for_training


def test_schedule_at_equals_the_python_schedule():
    for sched in (
        ScheduledFloat((0, 1.0), (8000, 0.25)),
        ScheduledFloat((0, 0.9), (20, 0.2)),
        ScheduledFloat((100, 0.1), (200, 0.5), (400, 0.3)),
        ScheduledFloat((5, 2.0)),
    ):
        for step in (0, 1, 3, 5, 19, 20, 21, 99, 100, 150, 200, 333, 400, 7999, 8000, 10**6):
            got = float(sched.at(torch.tensor(step)))
            assert abs(got - sched(step)) < 1e-6, (sched, step, got)


@pytest.mark.parametrize("direct", [False, True])
def test_balancer_gradient_written_out_equals_autograd(direct):
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(60):
        scale = float(torch.empty(()).uniform_(0.05, 8.0, generator=gen))
        x = torch.randn(3, 40, generator=gen) * scale + float(torch.randn((), generator=gen))
        mask = torch.rand(3, 40, generator=gen) > 0.2
        r = float(torch.empty(()).uniform_(0.1, 0.9, generator=gen))
        lo_p, hi_p = r - 0.05, r + 0.05
        limits = (_mean_limit(lo_p), _mean_limit(hi_p), 1.2533, 4 * 1.2533, (lo_p, hi_p) if direct else None)
        xr = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(violation_loss(xr, mask, limits), xr)
        got = limit_violation_grad(x, mask, limits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) + 1e-12)
        assert (got[~mask] == 0).all()
        hits += bool(want.abs().max() > 0)
    assert hits > 30  # most cases lie outside some limit, so the comparison is not of zeros


def _counting(backend_name):
    """A dynamo backend that counts the graphs it is handed and runs them as `backend_name`."""
    from torch._dynamo import lookup_backend

    count = [0]

    def backend(gm, example_inputs):
        count[0] += 1
        return lookup_backend(backend_name)(gm, example_inputs)

    return backend, count


@pytest.mark.parametrize("recipe", ["paper", "aligned", "mod"])
def test_training_compiles_once_and_equals_eager(recipe, monkeypatch):
    """Steps across the Balancer schedule (prob from 1 to its floor) and the bypass one: one graph,
    compiled once, fullgraph; loss, gradients and the calibrated threshold equal eager's. The coins
    (Balancer, flip, bypass limit) are fixed per step - a compiled graph may draw them in another
    order - at 0.3 or 0.7, so that each is taken both ways."""
    torch._dynamo.reset()
    coin = torch.tensor(0.3)  # a tensor: changing it is not a new constant for the graph
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: rand(*a, **k) * 0 + coin)
    cfg = tiny_config(balancer_steps=4, bypass_steps=6)
    if recipe == "mod":  # Mixture-of-Depths layers beside S, both routers and weightings
        cfg = cfg.replace(structure="TM(TM)T", mod_router="predictor", mod_weight="sigmoid", mod_capacity=0.3)
    else:
        cfg = cfg.with_selection(recipe)
    torch.manual_seed(0)
    eager = SubLLM(cfg).train()
    comp = SubLLM(cfg).train()
    comp.load_state_dict(eager.state_dict())
    backend, count = _counting("aot_eager")
    fwd = compile_for_training(comp, cfg, "cpu", backend=backend)
    x = torch.randint(3, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    for step in (0, 1, 2, 5, 9):
        outs = []
        for m, f in ((eager, eager), (comp, fwd)):
            m.zero_grad(set_to_none=True)
            m.set_step(step)
            coin.fill_(0.3 if step % 2 else 0.7)
            out = f(x, labels=x)
            out.loss.backward()
            outs.append(out)
        torch.testing.assert_close(outs[1].loss, outs[0].loss)
        torch.testing.assert_close(outs[1].keep_fractions, outs[0].keep_fractions)
        for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
            torch.testing.assert_close(b.grad, a.grad, msg=name)
        for a, b in zip(eager.buffers(), comp.buffers()):
            torch.testing.assert_close(b, a)
        with torch.no_grad():  # a real update between steps, as training does
            for a, b in zip(eager.parameters(), comp.parameters()):
                a.sub_(0.5 * a.grad)
                b.sub_(0.5 * b.grad)
    assert count[0] == 1


def test_compile_refusals(monkeypatch):
    with pytest.raises(SubLLMError, match="balancer_gate='weight'"):
        check_compilable(tiny_config(balancer_gate="weight"), "cpu")
    monkeypatch.setattr("subllm.trainer.compiled.cpu_compiler", lambda: None)
    with pytest.raises(SubLLMError, match="C\\+\\+ compiler"):
        check_compilable(tiny_config(), "cpu")
    check_compilable(tiny_config(), "cpu", backend="aot_eager")  # no C++ needed there


def test_train_cli_compile(tmp_path, monkeypatch, capsys):
    """`subllm train --compile`: the whole run compiles one graph (evaluation stays eager)."""
    import random

    from subllm.cli import main
    from subllm.trainer.compiled import compiled_graphs
    from subllm.trainer.metrics import read_metrics

    torch._dynamo.reset()
    monkeypatch.setattr("subllm.trainer.compiled.BACKEND", "aot_eager")
    rng = random.Random(0)
    words = "the a king queen river sea and or but not with night day".split()
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) + "." for _ in range(600)))
    out = tmp_path / "run"
    before = compiled_graphs()
    rc = main([
        "train", "--preset", "subllm-tiny", "--data", str(text), "--vocab-size", "300", "--steps", "4",
        "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--out", str(out),
        "--threads", "1", "--schedule-steps", "scale", "--no-progress", "--compile",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert compiled_graphs() - before == 1
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["config"]["compile"] is True
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
