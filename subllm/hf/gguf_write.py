"""Writing llama GGUF files (llama.cpp's format) with the `gguf` package: what the llama.cpp peer
benchmark (our weights as F32 / BF16 / Q8_0, benchmarks/llamacpp_gguf.py) and the tests' tiny GGUF
files (tests/gguf_writer.py) share - the q/k row order and the model's header and tensors.
`gguf` is imported inside the functions."""

from __future__ import annotations

import numpy as np


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's W_q / W_k rows -> llama.cpp's order. Per head, HF rotates dimension i with i + h/2,
    llama.cpp rotates 2i with 2i + 1: rows [a_0 .. a_{h/2-1}, b_0 .. b_{h/2-1}] -> [a_0, b_0, a_1, b_1, ..].
    `n_heads`: the heads the projection produces (n_heads for q, n_kv_heads for k); transformers'
    GGUF loader undoes it."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_llama_header(
    w, *, context: int, dim: int, n_layers: int, ffn_dim: int, n_heads: int, n_kv_heads: int,
    rope_theta: float, norm_eps: float, vocab_size: int,
) -> None:  # fmt: skip
    """The llama hyper-parameters of a GGUFWriter `w` (head dim = dim / n_heads)."""
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_vocab_size(vocab_size)


def write_tensors(w, tensors: dict[str, np.ndarray], quantize) -> None:
    """Add `tensors` to `w` (those `quantize(name, array)` gives a GGML type for are quantized to it,
    the rest stored as they are), write the file and close it."""
    import gguf

    for name, t in tensors.items():
        qtype = quantize(name, t)
        if qtype is None:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
