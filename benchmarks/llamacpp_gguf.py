"""Our all-T LLaMA (a SubLLM folder whose structure is all T) written as llama.cpp GGUF files, for
benchmarks/llamacpp_peer.py: the same weights in llama.cpp at F32, BF16 or Q8_0.

The writer is the `gguf` package's GGUFWriter (pinned in pyproject.toml); quantization is its numpy
reference (`gguf.quants.quantize`: BF16 rounds to nearest even, Q8_0 is ggml's reference
quantize_row_q8_0 - blocks of 32 weights, one fp16 scale max|w| / 127). As llama.cpp's own
convert_hf_to_gguf.py does: 1-D tensors (norms) stay F32, every 2-D tensor takes the file's type,
the tied LM head is the embedding (no output.weight), and the rows of W_q and W_k are permuted from
Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one (`permute_rope_rows`).
Hyperparameters come from our config.json; the tokenizer (tokenizer.* keys: vocabulary, merges,
pre-tokenizer, special ids, chat template) is copied from a reference GGUF of the same model, e.g.
SmolLM2-135M-Instruct.Q4_1.gguf, whose tokenizer ours was built from.

    python benchmarks/llamacpp_gguf.py --checkpoint runs/real/llama \\
        --reference data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --types F32,BF16,Q8_0 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
import torch

from subllm.hf.gguf_write import add_llama_header, permute_rope_rows, write_tensors
from subllm.model.io import read_pretrained

FILE_TYPES = {  # name -> (tensor type of 2-D weights, general.file_type)
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def llama_tensors(cfg, state: dict) -> dict[str, np.ndarray]:
    """Our parameter names -> llama.cpp's, as float32 numpy arrays (fused qkv and gate/up split)."""
    f = {k: v.float().numpy() for k, v in state.items()}
    hd = cfg.head_dim
    out = {"token_embd.weight": f["embed.weight"], "output_norm.weight": f["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = f["head.weight"]
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k, v = np.split(f[p + "attn.wqkv.weight"], [cfg.n_heads * hd, (cfg.n_heads + cfg.n_kv_heads) * hd])
        gate, up = np.split(f[p + "ffn.w13.weight"], 2)
        out |= {
            b + "attn_norm.weight": f[p + "attn_norm.weight"],
            b + "attn_q.weight": permute_rope_rows(q, cfg.n_heads),
            b + "attn_k.weight": permute_rope_rows(k, cfg.n_kv_heads),
            b + "attn_v.weight": v,
            b + "attn_output.weight": f[p + "attn.wo.weight"],
            b + "ffn_norm.weight": f[p + "ffn_norm.weight"],
            b + "ffn_gate.weight": gate,
            b + "ffn_up.weight": up,
            b + "ffn_down.weight": f[p + "ffn.w2.weight"],
        }
    return out


def write_gguf(checkpoint, reference, kind: str, path) -> Path:
    """Write `checkpoint` (an all-T SubLLM folder) as a llama GGUF of type `kind` (F32/BF16/Q8_0)."""
    cfg, state = read_pretrained(checkpoint)
    if cfg.n_subsamples or "M" in cfg.structure or cfg.rope_scaling:
        raise SystemExit(f"{checkpoint}: llama.cpp runs a plain LLaMA (all-T structure, no RoPE scaling)")
    qtype, ftype = FILE_TYPES[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"{Path(checkpoint).name} ({kind}, from subllm weights)")
    w.add_file_type(ftype)
    if qtype != gguf.GGMLQuantizationType.F32:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_llama_header(
        w, context=cfg.max_seq_len, dim=cfg.dim, n_layers=cfg.n_layers, ffn_dim=cfg.ffn_dim,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
        vocab_size=cfg.vocab_size,
    )  # fmt: skip
    ref = gguf.GGUFReader(str(reference))
    for key, field in ref.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    if len(ref.fields["tokenizer.ggml.tokens"].data) != cfg.vocab_size:
        raise SystemExit(f"{reference}: its vocabulary is not the size of {checkpoint}'s")
    tensors = {k: np.ascontiguousarray(t, dtype=np.float32) for k, t in llama_tensors(cfg, state).items()}
    plain = qtype == gguf.GGMLQuantizationType.F32
    write_tensors(w, tensors, lambda name, t: None if t.ndim == 1 or plain else qtype)
    return Path(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True, help="an all-T SubLLM folder (our LLaMA)")
    p.add_argument("--reference", required=True, help="a GGUF of the same model: its tokenizer is copied")
    p.add_argument("--types", default="F32,BF16,Q8_0")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    for kind in a.types.split(","):
        path = write_gguf(
            a.checkpoint, a.reference, kind, Path(a.out) / f"{Path(a.checkpoint).name}.{kind}.gguf"
        )
        print(f"{path} {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
