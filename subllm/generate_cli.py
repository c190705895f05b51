"""`subllm generate`: text from a checkpoint folder (config.json + model.safetensors + the tokenizer
saved beside them), through the cached engine of docs/method.md section 3.

    subllm generate --checkpoint runs/subllm --prompt "Once upon a time" --stream --max-new-tokens 64

The continuation goes to stdout; a one-line summary (tokens, seconds, tokens/s) to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from subllm.errors import SubLLMError


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
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast")
    p.add_argument("--no-cache", action="store_true", help="reference path: full forward every step")


def load_tokenizer(directory: Path):
    """The tokenizer saved beside a checkpoint (`AutoTokenizer.from_pretrained(directory)`)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise SubLLMError(f"loading the tokenizer needs transformers: {e}") from e
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((directory / name).is_file() for name in known):
        raise SubLLMError(
            f"no tokenizer beside the checkpoint in {directory} (none of {', '.join(known)}); "
            "save one there with tokenizer.save_pretrained(dir)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SubLLMError(
            f"cannot load a tokenizer from {directory} ({type(e).__name__}: {e}); "
            "save one beside the checkpoint (tokenizer.save_pretrained(dir))"
        ) from None


def run(args: argparse.Namespace) -> int:
    from subllm.generation import TextDeltas, generate, stream_generate, validate_sampling
    from subllm.model.subllm import SubLLM

    validate_sampling(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed
    )
    if args.max_new_tokens < 1:
        raise SubLLMError("--max-new-tokens must be >= 1")
    if not args.prompt.strip():
        raise SubLLMError("--prompt is empty")
    ckpt: Path = args.checkpoint
    if not ckpt.is_dir() or not (ckpt / "config.json").is_file():
        raise SubLLMError(
            f"no checkpoint at {ckpt} (expected a folder with config.json and model.safetensors)"
        )
    model = SubLLM.from_pretrained(ckpt).eval()
    tok = load_tokenizer(ckpt)
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
    )
    prompt = torch.tensor([ids])
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    t0 = time.perf_counter()
    count = 0
    with amp:
        if args.stream:
            deltas = TextDeltas(tok)
            for tokens in stream_generate(model, prompt, **kw):
                count += int(tokens[0] != model.config.pad_token_id)
                print(deltas.push(tokens)[0], end="", flush=True)
            print(deltas.flush()[0])
        else:
            out = generate(model, prompt, **kw)[0, T:]
            count = int((out != model.config.pad_token_id).sum())
            print(tok.decode(out.tolist(), skip_special_tokens=True))
    dt = time.perf_counter() - t0
    print(
        f"[{count} tokens in {dt:.2f} s, {count / dt:.1f} tokens/s; prompt {T} tokens, {args.dtype}]",
        file=sys.stderr,
    )
    return 0
