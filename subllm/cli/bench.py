"""`subllm bench <infer | ...>`: benchmarks of SUBLLM against the same-size LLaMA.

    subllm bench infer                                   # subllm-small, 1k-8k, batch 1 and 8, --dtypes auto
    subllm bench infer --lengths 8k --batch-sizes 1 --dtypes fp32 --reps 2
    subllm bench infer --quick                           # tiny CI smoke run, seconds
    subllm bench infer --checkpoint runs/x --text data/corpus/val/shakespeare_hamlet.txt --lengths 1k
                                                         # a trained model's keep and speed-up on real text

    subllm bench train --lengths 1k,2k --reps 2           # training steps (subllm/bench/train.py)
    subllm bench selection --runs 'runs/ablate/*' --unseen data/extra/val
                                                         # trained runs: keep, agreement, loss by group
    subllm bench serve --checkpoints runs/demo/subllm,runs/demo/llama --text data/corpus/val/x.txt
                                                         # `subllm serve` under load (subllm/bench/serve.py)

Each benchmark prints a human table, then ONE JSON line last (docs/design.md).
"""

from __future__ import annotations

import argparse
import sys

import torch

from subllm.bench.common import environment, int_list, json_line, str_list
from subllm.dtype import DTYPES
from subllm.errors import SubLLMError
from subllm.inference import int4_correction
from subllm.inference.engine import KV_DTYPES
from subllm.inference.quantize import QUANTIZE

QUICK = dict(
    preset="subllm-tiny", lengths="64,128", batch_sizes="1,2", dtypes="fp32", decode_tokens=4, reps=1
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    inf = sub.add_parser("infer", help="prefill / decode speed and KV-cache bytes vs LLaMA")
    inf.add_argument("--preset", default="subllm-small", help="model preset (default subllm-small)")
    inf.add_argument("--checkpoint", default=None, help="a SUBLLM checkpoint folder: trained scores")
    inf.add_argument(
        "--text",
        default=None,
        help="with --checkpoint: prompts are consecutive ctx-token windows of this text file (the "
        "checkpoint's tokenizer), decode is teacher-forced on the text's next tokens",
    )
    inf.add_argument("--lengths", default="1k,2k,4k,8k", help="prompt lengths, comma-separated (2k = 2048)")
    inf.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    inf.add_argument(
        "--dtypes",
        default="auto",
        help="comma-separated bf16 (autocast), fp32, auto; auto (default) = fp32 on a CPU (decoding is "
        "slower in bf16 there), bf16 on a GPU that has it",
    )
    inf.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="both models with weight-only int8 (linear layers and LM head) or int4 (layers; int8 head)",
    )
    int4_correction.add_arguments(inf)
    inf.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default="same",
        help="both models' K/V cache: same (the activations' dtype) or bf16 (half the bytes read per step)",
    )
    inf.add_argument(
        "--compile",
        action="store_true",
        help="both models decode through compiled graphs (subllm/inference/compiled_decode.py), "
        "compiled before timing, where the native runs of layers (fp32 on a CPU) do not take over",
    )
    inf.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per repetition")
    inf.add_argument("--reps", type=int, default=5, help="timed repetitions (interleaved)")
    inf.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    inf.add_argument(
        "--prefill-reps",
        type=int,
        default=None,
        help="timed prefill repetitions (default: --reps; "
        "fewer keeps long-context decode measurements affordable; prefill then gets no warm-up)",
    )
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    inf.add_argument("--no-bound", action="store_true", help="skip the zero-overhead prefill bound")
    inf.add_argument(
        "--no-bandwidth",
        action="store_true",
        help="skip measuring the memory bandwidth (the roofline columns; bytes per token stay)",
    )
    inf.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    inf.add_argument(
        "--hf", action="store_true", help="also time transformers' LlamaForCausalLM with the LLaMA's weights"
    )
    inf.add_argument("--quick", action="store_true", help="tiny smoke setting (overrides the sizes above)")

    from subllm.bench.train import add_train_arguments

    add_train_arguments(sub)

    from subllm.bench.selection import add_selection_arguments

    add_selection_arguments(sub)

    from subllm.bench.serve import add_serve_arguments

    add_serve_arguments(sub)

    from subllm.bench.compare import add_compare_arguments

    add_compare_arguments(sub)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise SubLLMError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.bench_command == "infer":
        return _run_infer(args)
    if args.bench_command == "train":
        from subllm.bench.train import run_train

        return run_train(args)
    if args.bench_command == "selection":
        from subllm.bench.selection import run_selection

        return run_selection(args)
    if args.bench_command == "serve":
        return _run_serve(args)
    if args.bench_command == "compare":
        return _run_compare(args)
    raise SubLLMError(f"unknown benchmark {args.bench_command!r}")  # pragma: no cover


def _run_infer(args: argparse.Namespace) -> int:
    from subllm.bench.infer import print_report, run_infer

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.decode_tokens < 1 or args.reps < 1 or args.warmup < 0:
        raise SubLLMError("--decode-tokens and --reps must be >= 1, --warmup >= 0")
    lengths, batches = int_list(args.lengths), int_list(args.batch_sizes)
    dtypes = str_list(args.dtypes, DTYPES)  # resolved in run_infer
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SubLLMError("--device cuda asked for, but torch sees no CUDA device")
    env = environment(args.device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    report = run_infer(
        args.preset, args.checkpoint, lengths, batches, dtypes, args.decode_tokens, args.reps, args.warmup,
        seed=args.seed, bound=not args.no_bound, log=log, text=args.text, device=args.device, hf=args.hf,
        prefill_reps=args.prefill_reps, bandwidth=not args.no_bandwidth,
        quantize=int4_correction.from_args(args), kv_dtype=args.kv_dtype, compile=args.compile,
    )  # fmt: skip
    print_report(report, env)
    print(json_line({"bench": "infer", "command": _command("infer"), "env": env, **report}))
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from subllm.bench.compare import markdown, run_compare

    report = run_compare(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if "summary" in report:
        print(markdown(report["summary"]))
        print(f"report: {args.out}/compare.md, compare.json, compare.png")
        print(
            json_line(
                {"bench": "compare", "command": _command("compare"), "env": environment("cpu"), **report}
            )
        )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from subllm.bench.serve import print_serve_report, run_serve_bench

    env = environment("cpu")
    report = run_serve_bench(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print_serve_report(report)
    print(json_line({"bench": "serve", "command": _command("serve"), "env": env, **report}))
    return 0


def _command(name: str) -> str | None:
    """The command line as typed, when run through `subllm bench NAME`."""
    argv = sys.argv[1:]
    return f"subllm bench {name} " + " ".join(argv[2:]) if argv[:2] == ["bench", name] else None
