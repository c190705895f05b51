"""Issue 22 item 3's target: is `--dtype auto` within 10% of the faster dtype, for decode and for
training, on this machine? For each model: the calibration's choice (subllm/dtype_calibration.py,
measured afresh into a temporary cache), then a longer interleaved timing of both dtypes (decode:
a 512-token prompt and 32 decode steps, batch 1; train: forward + backward of a (4, 256) batch),
and auto's time over the faster one's. One thread by default.

    python benchmarks/dtype_auto_check.py [--smollm2 runs/smol_llama] [--threads 1] [--reps 5]
"""

import argparse
import copy
import json
import os
import tempfile
import time

import torch

from subllm.config import get_preset
from subllm.dtype import autocast
from subllm.inference.engine import decode_step, new_cache, prefill
from subllm.model.subllm import SubLLM, load_model


def demo_model() -> SubLLM:  # `make demo`'s SUBLLM: TTT(TT(TT)TTT)TT, d 256
    cfg = get_preset("subllm-small").replace(structure="TTT(TT(TT)TTT)TT", dim=256, n_heads=4, n_kv_heads=4)
    return SubLLM(cfg)


def decode_fn(model, dtype):
    ids = torch.randint(3, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad(), autocast(dtype):
            c = new_cache(model, 1)
            logits = prefill(model, ids, None, c)
            t0 = time.perf_counter()
            for _ in range(32):
                logits = decode_step(model, c, logits.argmax(-1))
            return time.perf_counter() - t0  # the decode steps only

    return run


def train_fn(model, dtype):
    m = copy.deepcopy(model).train()
    m.set_step(0)
    ids = torch.randint(3, m.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))

    def run():
        t0 = time.perf_counter()
        with autocast(dtype):
            loss = m(ids, labels=ids).loss
        loss.backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2", default=None, help="a converted SmolLM2 folder (optional)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["SUBLLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="dtype_cal_")  # measure afresh
    from subllm.dtype_calibration import choose_dtype

    torch.manual_seed(0)
    models = {"demo": demo_model().eval(), "llama-small": SubLLM(get_preset("llama-small")).eval()}
    if a.smollm2:
        models["smollm2"] = load_model(a.smollm2).eval()
    out = []
    for name, model in models.items():
        for work, make in (("decode", decode_fn), ("train", train_fn)):
            chosen = choose_dtype("auto", model, work, "cpu", log=lambda m: None).dtype
            fns = {d: make(model, d) for d in ("fp32", "bf16")}
            for f in fns.values():
                f()  # warm-up
            best = {d: float("inf") for d in fns}
            for r in range(a.reps):  # interleaved, the order alternating
                for d in fns if r % 2 == 0 else reversed(list(fns)):
                    best[d] = min(best[d], fns[d]())
            faster = min(best, key=best.get)
            row = dict(model=name, work=work, auto=chosen, faster=faster,
                       fp32_s=round(best["fp32"], 4), bf16_s=round(best["bf16"], 4),
                       auto_over_best=round(best[chosen] / best[faster], 3))  # fmt: skip
            out.append(row)
            print(row, flush=True)
    worst = max(r["auto_over_best"] for r in out)
    print(f"worst auto / faster: {worst:.3f} (target <= 1.10)")
    print(json.dumps({"bench": "dtype_auto_check", "threads": a.threads, "rows": out}))


if __name__ == "__main__":
    main()
