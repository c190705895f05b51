"""Issue 20 item 5 on the real model: a saved SUBLLM folder (e.g. SmolLM2 converted and uptrained)
loaded with `AutoModelForCausalLM.from_pretrained`, fine-tuned a few steps by `transformers.Trainer`
on a text file, saved, and reloaded; prints the held-out loss before and after and a greedy sample.

    python benchmarks/hf_trainer_real.py runs/grid/sub080 --text data/corpus/train/austen_emma.txt \
        --heldout data/corpus/val/austen_persuasion.txt --steps 4 --out runs/hf_trainer
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def windows(tok, path: Path, seq_len: int, n: int) -> list[dict]:
    ids = tok(path.read_text(encoding="utf-8")[: 400 * seq_len * n])["input_ids"]
    rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(min(n, len(ids) // seq_len))]
    return [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]


@torch.no_grad()
def heldout_loss(model, rows: list[dict]) -> float:
    model.eval()
    losses = [model(input_ids=r["input_ids"][None], labels=r["labels"][None]).loss.item() for r in rows]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import subllm.hf  # noqa: F401  (registers model_type "subllm" with the Auto classes)

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    train_rows = windows(tok, a.text, a.seq_len, 2 * a.steps)
    held = windows(tok, a.heldout, a.seq_len, 8)
    before = heldout_loss(model, held)
    args = TrainingArguments(
        output_dir=str(a.out), max_steps=a.steps, per_device_train_batch_size=2, learning_rate=a.lr,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    model.train()
    result = Trainer(model=model, args=args, train_dataset=train_rows).train()
    after = heldout_loss(model, held)
    model.save_pretrained(a.out / "model")
    tok.save_pretrained(a.out / "model")
    again = AutoModelForCausalLM.from_pretrained(a.out / "model")
    reloaded = heldout_loss(again, held)
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    sample = again.generate(prompt, max_new_tokens=12, do_sample=False)
    steps, train_loss = result.global_step, result.training_loss
    print(f"Trainer: {steps} steps x 2 x {a.seq_len} tokens, train loss {train_loss:.3f}")
    print(f"held-out loss (8 x {a.seq_len} tokens of {a.heldout.name}): before {before:.4f}")
    print(f"  after {after:.4f},")
    print(f"  reloaded {reloaded:.4f} (ppl {math.exp(after):.1f})")
    print("greedy sample:", repr(tok.decode(sample[0, prompt.shape[1] :])))


if __name__ == "__main__":
    main()
