"""`subllm convert`: Hugging Face Llama <-> SUBLLM checkpoints, GGUF in, and the authors' format.

    subllm convert --from-hf-llama HF_DIR [--structure S] [--keep-ratio R] --out DIR
    subllm convert --from-gguf FILE.gguf [--structure S] [--keep-ratio R] --out DIR
    subllm convert --to-hf-llama SUBLLM_DIR --out HF_DIR
    subllm convert --from-official CKPT --config JSON --out DIR
    subllm convert --to-official SUBLLM_DIR --out DIR

The conversions themselves live in subllm/hf/llama.py, subllm/hf/gguf.py and subllm/hf/official.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from subllm.errors import SubLLMError
from subllm.hf.llama import copy_tokenizer_files, from_hf_llama_dir, to_hf_llama_dir


def parse_keep_ratio(text: str | None):
    """'0.64' -> 0.64; '0.7,0.6' -> [0.7, 0.6] (one per '(' in structure order); None -> None."""
    if text is None:
        return None
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise SubLLMError(f"--keep-ratio must be a number or comma-separated numbers, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def parse_rope_scaling(text: str | None) -> dict | None:
    """'{"rope_type": "linear", "factor": 2}' -> that dict; None -> None."""
    if text is None:
        return None
    from subllm.model.rope import rope_json

    return rope_json(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf-llama", metavar="DIR", help="a Hugging Face Llama directory to convert")
    src.add_argument("--to-hf-llama", metavar="DIR", help="an all-T SubLLM checkpoint to export as a Llama")
    src.add_argument(
        "--from-gguf", metavar="FILE", help="a llama-architecture GGUF file (llama.cpp), dequantized to fp32"
    )
    src.add_argument("--from-official", metavar="CKPT", help="the authors' SubllmModel state dict (.pt/.bin)")
    src.add_argument(
        "--to-official", metavar="DIR", help="a SubLLM checkpoint to export in the authors' format"
    )
    parser.add_argument("--config", metavar="JSON", help="with --from-official: the SubllmConfig JSON")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--structure",
        help="with --from-hf-llama/--from-gguf: e.g. 'TT(T(TT)T)T' (as many T as the Llama has layers)",
    )
    parser.add_argument(
        "--keep-ratio", help="with --structure: keep ratio per S, one value or one per '(' (default 0.64)"
    )
    parser.add_argument(
        "--rope-scaling",
        metavar="JSON",
        help="with --from-hf-llama/--from-gguf: RoPE scaling to use instead, as HF's rope_parameters, "
        'e.g. \'{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}\'',
    )
    parser.add_argument(
        "--max-seq-len", type=int, help="with --from-hf-llama/--from-gguf: the longest input to allow"
    )
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SubLLMError(f"{out} exists and is not empty (pass --overwrite to write into it)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out_dir(out, args.overwrite)
    if args.config and not args.from_official:
        raise SubLLMError("--config only applies to --from-official")
    if args.from_official or args.to_official:
        return run_official(args, out)
    if args.from_gguf:
        from subllm.hf.gguf import from_gguf

        done = from_gguf(
            args.from_gguf,
            out,
            args.structure,
            parse_keep_ratio(args.keep_ratio),
            parse_rope_scaling(args.rope_scaling),
            args.max_seq_len,
        )
        print(gguf_line(done, out))
        return 0
    if args.from_hf_llama:
        model = from_hf_llama_dir(
            args.from_hf_llama,
            out,
            args.structure,
            parse_keep_ratio(args.keep_ratio),
            parse_rope_scaling(args.rope_scaling),
            args.max_seq_len,
        )
        c = model.config
        new = (
            f"{c.n_subsamples} S + {c.n_subsamples} B modules initialised fresh"
            if c.n_subsamples
            else "all-T"
        )
        print(
            f"converted {args.from_hf_llama} -> {out}: structure {c.structure} ({new}), "
            f"{model.num_params():,} parameters"
        )
    else:
        if args.structure or args.keep_ratio or args.rope_scaling or args.max_seq_len:
            raise SubLLMError(
                "--structure/--keep-ratio/--rope-scaling/--max-seq-len only apply to --from-hf-llama "
                "and --from-gguf"
            )
        hf = to_hf_llama_dir(args.to_hf_llama, out)
        print(f"exported {args.to_hf_llama} -> {out}: LlamaForCausalLM, {hf.config.num_hidden_layers} layers")
    return 0


def gguf_line(done, out) -> str:
    """The one line a GGUF conversion prints (also `subllm data fetch-model --convert-to`)."""
    c, info = done.model.config, done.info
    new = f"{c.n_subsamples} S + {c.n_subsamples} B modules initialised fresh" if c.n_subsamples else "all-T"
    return (
        f"converted {info.path} -> {out}: structure {c.structure} ({new}), {done.model.num_params():,} "
        f"parameters; {info.types_line()} dequantized to fp32, tokenizer + chat template saved "
        f"({sum(done.seconds.values()):.1f} s)"
    )


def run_official(args: argparse.Namespace, out: Path) -> int:
    from subllm.hf.official import from_official, to_official

    if args.structure or args.keep_ratio:
        raise SubLLMError("--structure/--keep-ratio only apply to --from-hf-llama and --from-gguf")
    if args.from_official:
        if not args.config:
            raise SubLLMError("--from-official needs --config JSON (the SubllmConfig fields)")
        model = from_official(args.from_official, args.config)
        model.save_pretrained(out)
        c = model.config
        print(
            f"converted {args.from_official} -> {out}: structure {c.structure}, keep ratio "
            f"{c.keep_ratio}, norm eps {c.norm_eps:g}, tied {c.tie_embeddings}, "
            f"{model.num_params():,} parameters"
        )
        return 0
    from subllm.model.subllm import SubLLM

    weights, config = to_official(SubLLM.from_pretrained(args.to_official), out)
    copy_tokenizer_files(args.to_official, out)
    print(f"exported {args.to_official} -> {weights} + {config} (the authors' SubllmModel format)")
    return 0
