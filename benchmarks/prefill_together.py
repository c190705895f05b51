"""Issue 21: waiting prompts prefilled one at a time or as one batch (`subllm serve --prefill-batch`),
in process: random token ids, 5 interleaved rounds, medians; then whether the batch's last-token
logits equal each prompt's batch-1 prefill (left-padded rows of different lengths), per dtype.

    python benchmarks/prefill_together.py CHECKPOINT [--dtype bf16] [--threads 1]
"""

import argparse
import statistics
import time

import torch

from subllm.dtype import autocast
from subllm.inference import hugepages, native
from subllm.inference.engine import new_cache, prefill
from subllm.model.subllm import load_model


def left_padded(ids: torch.Tensor, lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, ids.shape[1] - n :] = 1
    return ids * mask, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    print(f"native kernels: {native.status()}; cpu capability {native.capability()}; threads {a.threads}")
    model = hugepages.place(load_model(a.checkpoint).eval())
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for n, L in ((4, 512), (8, 128), (16, 64)):
        ids = torch.randint(5, vocab, (n, L), generator=g)

        def alone(ids=ids, n=n):
            for i in range(n):
                prefill(model, ids[i : i + 1], None, new_cache(model, 1))

        def together(ids=ids, n=n):
            prefill(model, ids, None, new_cache(model, n, packed=True))

        t = {"alone": [], "together": []}
        with autocast(a.dtype, "cpu"):
            alone(), together()
            for r in range(5):
                order = (("alone", alone), ("together", together))
                for name, f in order if r % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    f()
                    t[name].append(time.perf_counter() - t0)
        s, b = statistics.median(t["alone"]), statistics.median(t["together"])
        print(f"{n} x {L} tokens, {a.dtype}: one at a time {s:.3f} s, together {b:.3f} s, {s / b:.2f}x")
    for dt in ("fp32", "bf16"):
        for lens in ([64, 40, 17, 64], [120, 7, 90]):
            ids, mask = left_padded(torch.randint(5, vocab, (len(lens), max(lens)), generator=g), lens)
            with autocast(dt, "cpu"):
                got = prefill(model, ids, mask, new_cache(model, len(lens), packed=True)).float()
                rows = [
                    prefill(model, ids[i : i + 1, -n:], None, new_cache(model, 1)) for i, n in enumerate(lens)
                ]
                want = torch.cat(rows).float()
            print(f"{dt} rows of {lens}: max |logit together - alone| {(got - want).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
