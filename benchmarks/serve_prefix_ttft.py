"""Time to first token of a request whose prompt starts with a prefix already served (issue 21
item 6, automatic prefix caching; subllm/serve/prefix_cache.py): `subllm serve`'s batcher, driven
in-process step by step, with and without the prefix store. Per repeat, a fresh batcher serves
request A (prefix + suffix A), then request B (prefix + suffix B), each alone, one token each;
prints a table, then ONE JSON line.

    python benchmarks/serve_prefix_ttft.py --checkpoint runs/real_smoke/subllm --prefix-tokens 2048

TTFT is the batcher's own (request created -> first token sampled), no HTTP. Prompt ids are drawn
at random below the vocabulary size. Wall-clock numbers: they carry whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from subllm.cli.serve import load_server
from subllm.serve.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from subllm.serve.request import Request, Settings


def ttft(batcher, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, that token) of `prompt` served alone."""
    r = Request(prompt, Settings(max_tokens=1, temperature=0.0, ignore_eos=True), lambda *a: None)
    batcher.submit(r)
    while not r.done:
        batcher.step(batcher._pop_admissible())
    return r.first_token_at - r.arrived, r.tokens[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--prefix-tokens", type=int, default=2048)
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for mb in (0, args.prefix_cache_mb):
        first, second, tokens, stats = [], [], [], None
        for rep in range(args.repeats):
            batcher, _ = load_server(args.checkpoint, 4, 8, "fp32", "bench", prefill_chunk=args.prefill_chunk,
                                     prefix_cache_mb=mb)  # fmt: skip
            V = batcher.model.config.vocab_size
            g = torch.Generator().manual_seed(rep)
            pre, sa, sb = (torch.randint(4, V, (n,), generator=g).tolist()
                           for n in (args.prefix_tokens, args.suffix_tokens, args.suffix_tokens))  # fmt: skip
            with torch.no_grad():
                ta, _ = ttft(batcher, pre + sa)
                tb, tok = ttft(batcher, pre + sb)
            first.append(ta)
            second.append(tb)
            tokens.append(tok)
            stats = None if batcher.prefix_store is None else batcher.prefix_store.stats()
        rows["on" if mb else "off"] = {
            "prefix_cache_mb": mb,
            "ttft_first_s": statistics.median(first),
            "ttft_second_s": statistics.median(second),
            "speedup_second_vs_first": statistics.median(first) / statistics.median(second),
            "second_tokens": tokens,
            "store": stats,
        }
    same = rows["on"]["second_tokens"] == rows["off"]["second_tokens"]
    print(f"{'prefix cache':>12} {'TTFT first (s)':>15} {'TTFT second (s)':>16} {'first/second':>13}")
    for name, r in rows.items():
        a, b, x = r["ttft_first_s"], r["ttft_second_s"], r["speedup_second_vs_first"]
        print(f"{name:>12} {a:15.3f} {b:16.3f} {x:13.2f}")
    print(f"second request's first token equal with and without the cache: {same}")
    head = {"checkpoint": str(args.checkpoint), "prefix_tokens": args.prefix_tokens,
            "suffix_tokens": args.suffix_tokens, "prefill_chunk": args.prefill_chunk,
            "threads": args.threads, "repeats": args.repeats}  # fmt: skip
    print(json.dumps({**head, "same_tokens": same, **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
