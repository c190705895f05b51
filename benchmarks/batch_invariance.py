"""Does a request decode the same alone and in a batch? B windows of Persuasion (1,024 tokens each,
bf16 prefill in chunks of 512 as `subllm serve` runs them) prefilled one by one, then one decode step
for each row alone and for all rows joined into one cache (rows stored apart, as serve's batcher
holds them): the largest |logit| difference per row. Then serve's batcher itself, in process, greedy:
how many of the B requests generate other tokens than their solo `generate()`.

    python benchmarks/batch_invariance.py CHECKPOINT [--kv-dtype same|bf16] [--rows 4] [--tokens 128]
        [--quantize none|int8|int4]
"""

import argparse

import torch

from subllm.bench.serve import prompt_windows
from subllm.data.tokenizer import load_tokenizer
from subllm.dtype import autocast
from subllm.inference import native
from subllm.inference.chunked_prefill import prefill_chunked
from subllm.inference.engine import decode_step, new_cache, set_kv_dtype
from subllm.inference.generation import generate
from subllm.inference.quantize import apply_quantization
from subllm.model.subllm import load_model
from subllm.serve.batcher import Batcher
from subllm.serve.prefill import DEFAULT_PREFILL_CHUNK
from subllm.serve.request import Request, Settings

TEXT = "data/corpus/val/austen_persuasion.txt"


def one_step(model, prompts: list[list[int]]) -> list[float]:
    def prefilled(p):
        cache = new_cache(model, 1, packed=True)  # outside the bf16 region: it keeps the decode's dtype
        with autocast("bf16", "cpu"):
            logits = prefill_chunked(model, torch.tensor([p]), None, cache, DEFAULT_PREFILL_CHUNK)
        return cache, logits.float().argmax(-1)

    alone = [decode_step(model, c, t).float()[0] for c, t in map(prefilled, prompts)]
    parts = [prefilled(p) for p in prompts]
    batch = parts[0][0]
    for c, _ in parts[1:]:
        batch.add_rows(c)
    together = decode_step(model, batch, torch.cat([t for _, t in parts])).float()
    return [(together[i] - a).abs().max().item() for i, a in enumerate(alone)]


def served(model, tok, prompts: list[list[int]], tokens: int) -> int:
    b = Batcher(model, tok, None, max_batch=len(prompts), max_queue=4 * len(prompts), prefill_dtype="bf16")
    settings = Settings(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    reqs = [Request(p, settings, lambda kind, x: None) for p in prompts]
    b.submit(reqs)
    while b.running or b.prefilling or b.waiting:
        b.step(b._pop_admissible())
    differ = 0
    for p, r in zip(prompts, reqs):
        out = generate(model, torch.tensor([p]), max_new_tokens=tokens, eos_token_id=None,
                       prefill_chunk=DEFAULT_PREFILL_CHUNK, prefill_dtype="bf16")  # fmt: skip
        differ += out[0, len(p) :].tolist() != r.tokens
    return differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--kv-dtype", choices=("same", "bf16"), default="same")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    model = set_kv_dtype(apply_quantization(load_model(a.checkpoint).eval(), a.quantize), a.kv_dtype)
    prompts = prompt_windows(TEXT, a.checkpoint, [1024], a.rows, model.config.vocab_size)
    print(f"{a.checkpoint}: decode kernels {native.status()}; K/V {a.kv_dtype}; weights {a.quantize}")
    diffs = one_step(model, prompts)
    print(f"one decode step, {a.rows} rows together vs each alone: max |dlogit| per row", diffs)
    if a.tokens:
        n = served(model, load_tokenizer(a.checkpoint), prompts, a.tokens)
        print(f"serve's batcher, {a.rows} requests x {a.tokens} greedy tokens: {n} differ from generate()")


if __name__ == "__main__":
    main()
