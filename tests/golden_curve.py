"""The golden tiny training runs (design.md invariant 5): the paper's rule with AdamW, and the
default ("aligned") selection with ScaledAdam + Eden and the 0.5x score learning rate.
`python tests/golden_curve.py` rewrites tests/golden/*.json - do that only for an intended change
of the maths, and say so."""

import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"  # paper rule, AdamW
GOLDEN_ALIGNED = Path(__file__).parent / "golden" / "tiny_loss_aligned.json"  # defaults, ScaledAdam


def run_curve(steps: int = 30, recipe: str = "paper", optimizer: str = "adamw") -> list[float]:
    from helpers import tiny_config

    from subllm import SubLLM
    from subllm.optim import build_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order
    try:
        torch.manual_seed(1234)
        cfg = tiny_config(balancer_steps=20, bypass_steps=40).with_selection(recipe)
        model = SubLLM(cfg).train()
        if recipe == "paper":
            with torch.no_grad():
                for s in model.subsamples:
                    s.score.weight.mul_(40.0)
        if optimizer == "adamw":
            opt, sched = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), None
        else:
            opt, sched = build_optimizer(model, optimizer, None, steps, tokens_per_step=4 * 33)
        g = torch.Generator().manual_seed(99)
        data = torch.randint(0, cfg.vocab_size, (2, 4, 33), generator=g)  # two batches, memorisable
        losses = []
        for step in range(steps):
            model.set_step(step)
            if sched is not None:
                sched.step(step)
            batch = data[step % 2]
            out = model(batch, labels=batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.lm_loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": 30, "losses": run_curve()}, indent=1) + "\n")
    aligned = run_curve(30, "aligned", "scaled_adam")
    GOLDEN_ALIGNED.write_text(json.dumps({"steps": 30, "losses": aligned}, indent=1) + "\n")
    print(GOLDEN.read_text(), GOLDEN_ALIGNED.read_text())
