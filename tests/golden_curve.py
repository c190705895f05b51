"""The golden tiny training run (design.md invariant 5). `python tests/golden_curve.py` rewrites
tests/golden/tiny_loss.json - do that only for an intended change of the maths, and say so."""

import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "tiny_loss.json"


def run_curve(steps: int = 30) -> list[float]:
    from helpers import tiny_config

    from subllm import SubLLM
    from subllm.config import SELECTION_RECIPES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed reduction order
    try:
        torch.manual_seed(1234)
        cfg = tiny_config(balancer_steps=20, bypass_steps=40, **SELECTION_RECIPES["paper"])
        model = SubLLM(cfg).train()
        with torch.no_grad():
            for s in model.subsamples:
                s.score.weight.mul_(40.0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(99)
        data = torch.randint(0, cfg.vocab_size, (2, 4, 33), generator=g)  # two batches, memorisable
        losses = []
        for step in range(steps):
            model.set_step(step)
            batch = data[step % 2]
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": 30, "losses": run_curve()}, indent=1) + "\n")
    print(GOLDEN.read_text())
