"""`subllm <verb>`: each subcommand is a plain function in its own module, imported lazily.

A command module provides `add_arguments(parser)` and `run(args) -> int | None`.
Errors the user can fix raise `SubLLMError` and are printed as one line, no stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from subllm.errors import SubLLMError

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("subllm.cli.demo", "the main job: train SUBLLM and the same-size LLaMA side by side"),
    "data": ("subllm.cli.data", "fetch corpora, train tokenizers, pack token shards"),
    "train": ("subllm.cli.train", "pretrain a SUBLLM (or the LLaMA baseline)"),
    "generate": ("subllm.cli.generate", "generate text from a checkpoint"),
    "serve": ("subllm.cli.serve", "an OpenAI-compatible HTTP server with continuous batching"),
    "bench": ("subllm.cli.bench", "benchmarks: SUBLLM vs the same-size LLaMA"),
    "eval": ("subllm.cli.eval", "evaluate a checkpoint: loss, bits per byte, few-shot tasks"),
    "convert": ("subllm.cli.convert", "convert between Hugging Face Llama and SUBLLM checkpoints"),
    "recalibrate": ("subllm.cli.recalibrate", "set a model's inference thresholds from text"),
    "analyze": ("subllm.cli.analyze", "per-token scores, kept tokens and attention analysis"),
    "info": ("subllm.cli.info", "print a preset's parameter count, structure and FLOP ratios"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # only import the module of the verb actually used (keeps `subllm --help` fast)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for verb, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except SubLLMError as e:
        print(f"subllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
