"""`subllm generate`: text from a checkpoint folder (config.json + model.safetensors + the tokenizer
saved beside them), through the cached engine of docs/method.md section 3.

    subllm generate --checkpoint runs/subllm --prompt "Once upon a time" --stream --max-new-tokens 64

The continuation goes to stdout; a one-line summary (tokens, seconds, tokens/s) to stderr.
`--stats` adds to stderr, per S, the realised keep (kept / entered tokens) over the prompt and over
the generated tokens, counted from the KV cache's per-level lengths after prefill and after decode
(the last generated token, which generation never feeds back, is fed once more for the count, after
the timing), and the FLOP-ideal decode speed-up that this keep buys over the same-size LLaMA at this
context (subllm/flops.py). With `--no-cache` the same counts come from eval-mode full forwards of
the prompt and of prompt + generated tokens (inference is causal, so they equal the cache's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from subllm.dtype import DTYPES, autocast
from subllm.errors import SubLLMError
from subllm.inference import int4_correction
from subllm.inference.engine import KV_DTYPES
from subllm.inference.quantize import QUANTIZE


def add_dtype_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize and --compile, as `generate` and `serve` take them."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="bf16 (autocast) or fp32; auto (default): the faster of the two for this machine and model, "
        "measured once and cached (subllm/dtype_calibration.py); fp32 on a CPU without native bf16",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="weight-only quantization (subllm/inference/quantize.py): int8 linear layers and LM head "
        "(a quarter of the weight bytes per decode step), or int4 layers (groups of 32) with an int8 head",
    )
    int4_correction.add_arguments(p)
    p.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="same",
        help="the K/V cache's dtype: same (default: the activations') or bf16 (half the bytes a decode "
        "step reads at long contexts; attention still computes in fp32; subllm/inference/engine.py)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile'd graphs (subllm/inference/compiled_decode.py): less "
        "per-token overhead, after a one-time compilation (a C++ compiler; minutes on a small CPU). "
        "On a CPU where the native kernels build, an fp32 decode already runs each run of layers as "
        "one native call (subllm/inference/native_layers.py; faster than the graphs) and the graphs "
        "serve only what that cannot run (bf16 decode, other layer kinds)",
    )
    p.add_argument(
        "--prefill-dtype",
        choices=("same", "auto", "bf16"),
        default="same",
        help="the prompt's prefill in another dtype than decode: bf16 (large matmuls: 1.6x faster on "
        "an AVX512-BF16 EPYC, 3.5x on an AMX Xeon, ~80x SLOWER on AVX2-only CPUs; decode is often faster "
        "in fp32), auto (bf16 only where a measurement of prefill says so, cached like --dtype auto), "
        "same (default: --dtype's)",
    )


def resolve_prefill_dtype(name: str, model, decode_dtype: str, log=None) -> str | None:
    """--prefill-dtype -> the prefill_dtype of generate / the server (None: as decode)."""
    if name == "same" or decode_dtype == "bf16":  # only a bf16 prefill under an fp32 decode differs
        return None
    if name == "auto":
        from subllm.dtype_calibration import choose_dtype

        name = choose_dtype("auto", model, "prefill", "cpu", log=log).dtype
    return name if name == "bf16" else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="folder with config.json, weights, tokenizer"
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    add_dtype_arguments(p)
    p.add_argument("--no-cache", action="store_true", help="reference path: full forward every step")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="prefill the prompt N tokens at a time (bounded peak memory for a long prompt; same output)",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="stderr: realised keep per S over prompt / generated tokens, FLOP-ideal decode speed-up",
    )


def run(args: argparse.Namespace) -> int:
    from subllm.inference.generation import TextDeltas, generate, stream_generate, validate_sampling

    validate_sampling(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed
    )
    if args.max_new_tokens < 1:
        raise SubLLMError("--max-new-tokens must be >= 1")
    if not args.prompt.strip():
        raise SubLLMError("--prompt is empty")
    from subllm.data.tokenizer import load_tokenizer_for
    from subllm.model.io import resolve_checkpoint
    from subllm.model.subllm import load_model

    ckpt = resolve_checkpoint(args.checkpoint)  # a model folder or a run folder
    from subllm.inference import hugepages
    from subllm.inference.engine import set_kv_dtype
    from subllm.inference.quantize import apply_quantization, describe

    model = set_kv_dtype(apply_quantization(load_model(ckpt), int4_correction.from_args(args)), args.kv_dtype)
    hugepages.place(model)  # the weights each decode step streams, on huge pages
    tok = load_tokenizer_for(ckpt)
    ids = list(tok(args.prompt)["input_ids"])
    if not ids:
        raise SubLLMError("--prompt is empty after tokenization")
    T, max_len = len(ids), model.config.max_seq_len
    if T >= max_len:
        raise SubLLMError(f"the prompt is {T} tokens; max_seq_len is {max_len} (room for no new token)")
    n = min(args.max_new_tokens, max_len - T)
    if n < args.max_new_tokens:
        print(f"note: generating {n} tokens (max_seq_len {max_len} - prompt {T})", file=sys.stderr)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    kw = dict(
        max_new_tokens=n,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=eos,
        use_cache=not args.no_cache,
        seed=args.seed,
        prefill_chunk=args.prefill_chunk,
    )
    held: dict = {}
    if args.stats and not args.no_cache:
        kw["on_prefill"] = lambda cache: held.update(cache=cache, before=cache.snapshot())
    prompt = torch.tensor([ids])
    from subllm.dtype_calibration import choose_dtype

    choice = choose_dtype(args.dtype, model, "decode", "cpu")
    amp = autocast(choice.dtype, "cpu")
    kw["prefill_dtype"] = resolve_prefill_dtype(args.prefill_dtype, model, choice.dtype)
    if kw["prefill_dtype"]:
        print(f"prefill in {kw['prefill_dtype']}, decode in {choice.dtype}", file=sys.stderr)
    if args.compile:
        from subllm.inference.compiled_decode import compile_and_warm

        print("compiling the decode step (once per process) ...", file=sys.stderr, flush=True)
        dt = compile_and_warm(model, choice.dtype, (1,))
        print(f"compiled the decode step in {dt:.0f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    count = 0
    with amp:
        if args.stream:
            deltas = TextDeltas(tok)
            new = []
            for tokens in stream_generate(model, prompt, **kw):
                new.append(tokens)
                count += int(tokens[0] != model.config.pad_token_id)
                print(deltas.push(tokens)[0], end="", flush=True)
            print(deltas.flush()[0])
            out = torch.stack(new, 1)[0]
        else:
            out = generate(model, prompt, **kw)[0, T:]
            count = int((out != model.config.pad_token_id).sum())
            print(tok.decode(out.tolist(), skip_special_tokens=True))
    dt = time.perf_counter() - t0
    print(
        f"[{count} tokens in {dt:.2f} s, {count / dt:.1f} tokens/s; prompt {T} tokens, {choice.line}"
        f"{'' if args.quantize == 'none' else '; ' + describe(model)}"
        f"{'; compiled decode' if args.compile else ''}{'; bf16 K/V' if args.kv_dtype == 'bf16' else ''}]",
        file=sys.stderr,
    )
    if args.stats:
        with amp:
            before, after = _stats_lengths(model, prompt, out, held)
        _print_stats(model.config, before, after, "KV cache" if held else "full forwards (--no-cache)")
    return 0


def _stats_lengths(model, prompt, out, held: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Per-level per-row lengths (KVCache.snapshot() layout) after the prompt and after prompt +
    generated tokens `out` (n,): from the cache that generation filled, or from full forwards."""
    from subllm.inference.engine import decode_step

    with torch.no_grad():
        if held:
            cache = held["cache"]
            assert cache.length(0, 0) == prompt.shape[1] + len(out) - 1  # the last token is not fed
            decode_step(model, cache, out[-1:])
            return held["before"], cache.snapshot()
        lengths = []
        for ids in (prompt, torch.cat([prompt, out[None]], 1)):
            sels = model(ids, return_selections=True).selections
            lengths.append([[ids.shape[1]]] + [[0] if s is None else s.n_kept.tolist() for s in sels])
        return lengths[0], lengths[1]


def _print_stats(cfg, before: list[list[int]], after: list[list[int]], source: str) -> None:
    from subllm.config import module_names
    from subllm.flops import decode_ideal_speedup, keep_counts

    def frac(k: int, n: int) -> str:
        return f"{k}/{n} = {k / n:.3f}" if n else f"{k}/{n} = -"

    zero = [[0] * len(lens) for lens in before]
    print(f"stats from the {source}; S i sees the tokens its enclosing S kept:", file=sys.stderr)
    names = module_names(cfg.structure)  # S<i>, or M<i> for an `M` layer's router
    for i, ((kp, np_), (kg, ng)) in enumerate(
        zip(keep_counts(cfg, zero, before), keep_counts(cfg, before, after))
    ):
        print(f"  keep {names[i]}: prompt {frac(kp, np_)}, generated {frac(kg, ng)}", file=sys.stderr)
    T, n = sum(before[0]), sum(after[0]) - sum(before[0])
    print(
        f"  decode FLOP-ideal speed-up vs the same-size LLaMA with this keep (context {T} -> {T + n}): "
        f"{decode_ideal_speedup(cfg, before, after):.3f}x",
        file=sys.stderr,
    )
