"""Where a decode step's time goes, timed inside the step (issue 22): the native runs of layers, the
LM head and each small piece around them (RoPE rows, final norm, cache appends, an S's decision and
U + B), and the rest (Python), per token; best of 5 passes over 64 teacher-forced tokens after a
prompt. With `--keep-all --llama DIR`, the structure's own cost instead: the SUBLLM with every S
keeping every token against its LLaMA (same weights, same work but for the S modules, U + B and
the extra native calls), interleaved in one process. int4 weights, bf16 K/V (`subllm bench infer`'s
fastest decode setting), huge pages. Not a benchmark of record (bench infer is).

    python benchmarks/decode_sections.py CHECKPOINT [--context 512] [--threads 1] [--text FILE]
    python benchmarks/decode_sections.py CHECKPOINT --keep-all --llama runs/smol_llama
"""

import argparse
import time

import torch

import subllm.inference.engine as engine
from subllm.data.tokenizer import load_tokenizer_for
from subllm.inference import hugepages, native_layers
from subllm.inference.cache import KVCache
from subllm.inference.engine import decode_step, new_cache, prefill, set_kv_dtype
from subllm.inference.quantize import apply_quantization
from subllm.model.io import resolve_checkpoint
from subllm.model.subllm import load_model


def prepared(directory):
    model = apply_quantization(load_model(resolve_checkpoint(directory)).eval(), "int4")
    return hugepages.place(set_kv_dtype(model, "bf16"))


def tokens(directory, text, n, vocab):
    if not text:
        return torch.randint(0, vocab, (n,))
    ids = load_tokenizer_for(resolve_checkpoint(directory)).encode(open(text).read())
    return torch.tensor(ids[:n])


def timed(acc: dict, owner, name: str) -> None:
    """Wrap owner.name so that its time adds to acc[name]."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = real(*args, **kwargs)
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return out

    setattr(owner, name, wrapper)


def decode_ms(models: dict, ids: torch.Tensor, steps: torch.Tensor, acc: dict, passes: int = 5) -> dict:
    """{name: (best ms per token, {piece: ms per token})}, the models' passes interleaved."""
    best = {}
    with torch.no_grad():
        caches = {}
        for name, model in models.items():
            cache = new_cache(model, 1)
            prefill(model, ids[None], None, cache, extra=len(steps))
            caches[name] = (cache, cache.snapshot())
        for _ in range(passes):
            for name, model in models.items():
                cache, snap = caches[name]
                cache.rewind(snap)
                acc.clear()
                t = time.perf_counter()
                for tok in steps:
                    decode_step(model, cache, tok[None])
                ms = (time.perf_counter() - t) / len(steps) * 1e3
                if name not in best or ms < best[name][0]:
                    best[name] = (ms, {k: v / len(steps) * 1e3 for k, v in acc.items()})
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", help="prompt and decode tokens from this text (default: random ids)")
    p.add_argument("--keep-all", action="store_true", help="every S keeps every token; needs --llama")
    p.add_argument("--llama", help="the all-T LLaMA the SUBLLM came from (with --keep-all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = prepared(a.checkpoint)
    ids = tokens(a.checkpoint, a.text, a.context + 64, model.config.vocab_size)
    prompt, steps = ids[: a.context], ids[a.context :]
    acc: dict = {}
    if a.keep_all:
        if not a.llama:
            p.error("--keep-all needs --llama")
        with torch.no_grad():
            for sub in model.subsamples:
                sub.threshold.fill_(-1e9)
        got = decode_ms({"keep_all": model, "llama": prepared(a.llama)}, prompt, steps, acc)
        sub_ms, llama_ms = got["keep_all"][0], got["llama"][0]
        print(f"ctx {a.context}, {a.threads} thread(s): every S keeping every token {sub_ms:.3f} ms,")
        print(f"the LLaMA {llama_ms:.3f} ms: the structure costs {sub_ms - llama_ms:.3f} ms per token")
        return
    wrapped = [(native_layers, "run"), (engine, "decode_cos_sin"), (native_layers, "final_norm")]
    wrapped += [(native_layers, "decide"), (native_layers, "bypass"), (KVCache, "append")]
    for owner, name in wrapped:
        timed(acc, owner, name)
    timed(acc, model.head, "forward")
    ms, pieces = decode_ms({"model": model}, prompt, steps, acc)["model"]
    rest = ms - sum(pieces.values())
    parts = ", ".join(f"{k} {v:.3f}" for k, v in pieces.items())
    print(f"ctx {a.context}, {a.threads} thread(s): {ms:.3f} ms per token - {parts} (forward: the head)")
    print(f"the rest (Python around them): {rest:.3f} ms")


if __name__ == "__main__":
    main()
