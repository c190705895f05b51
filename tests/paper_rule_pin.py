"""The paper's selection rule, pinned (issue 9): one seeded training step and one eval forward of a
tiny paper-rule model, recorded from the implementation that predates the selection options.
`python tests/paper_rule_pin.py` rewrites tests/golden/paper_rule.json - only for an intended
change of the paper rule's maths, and say so."""

import json
from pathlib import Path

import torch

PIN = Path(__file__).parent / "golden" / "paper_rule.json"


def run_pin(**paper) -> dict:
    """`paper`: the ModelConfig fields that name the paper's rule (empty before they existed)."""
    from helpers import tiny_config

    from subllm import SubLLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(7)
        cfg = tiny_config(balancer_steps=20, bypass_steps=40, **paper)
        model = SubLLM(cfg)
        with torch.no_grad():
            for s in model.subsamples:
                s.score.weight.mul_(40.0)
        x = torch.randint(3, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(x)
        mask[1, :7] = 0  # one left-padded row: the ragged top-k path too
        model.train()
        model.set_step(3)
        out = model(x, attention_mask=mask, labels=x, return_selections=True)
        out.loss.backward()
        model.eval()
        with torch.no_grad():
            ev = model(x, attention_mask=mask, return_selections=True)
        return {
            "train_loss": out.loss.item(),
            "train_idx": [s.idx.tolist() for s in out.selections],
            "train_weight": [s.weight.tolist() for s in out.selections],
            "score_grad": [m.score.weight.grad.flatten().tolist() for m in model.subsamples],
            "bypass_grad": [b.scale.grad.tolist() for b in model.bypasses],
            "eval_idx": [s.idx.tolist() for s in ev.selections],
            "eval_logits": ev.logits[:, ::7, :5].tolist(),
        }
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    PIN.write_text(json.dumps(run_pin()) + "\n")
    print(f"wrote {PIN} ({PIN.stat().st_size:,} bytes)")
