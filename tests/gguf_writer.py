"""A tiny GGUF writer for tests/test_gguf.py: an HF LlamaForCausalLM and its byte-level BPE tokenizer
written in the layout llama.cpp's converter produces, so the "GGUF in" path (subllm/hf/gguf.py) can be
tested on files the test makes itself.

llama.cpp's conventions for the "llama" architecture, reproduced here:
- metadata `llama.*` (block_count, embedding_length, feed_forward_length, attention.head_count[_kv],
  attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count, context_length, vocab_size)
  and `tokenizer.ggml.*`, `tokenizer.chat_template`;
- tensors `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}`, `output_norm`, and `output` only when the embeddings are not tied;
- the q/k rows permuted from HF's rotate-half RoPE layout into llama.cpp's adjacent pairs
  (`permute_rope_rows`, subllm/hf/gguf_write.py), which transformers' GGUF loader undoes;
- norms always F32; matrices F32, or Q8_0 where asked.
"""

import json

import gguf
import numpy as np
import torch

from subllm.hf.gguf_write import add_llama_header, permute_rope_rows, write_tensors

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "Hello world! Hello there, how are you? I am fine, thank you.\n"
    "def add(a, b):\n    return a + b\n"
    "the quick brown fox jumps over the lazy dog; the end.\n"
)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """An HF Llama's weights under llama.cpp's names, float32, in llama.cpp's order."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = sd[hf + "input_layernorm.weight"]
        q, k = sd[hf + "self_attn.q_proj.weight"], sd[hf + "self_attn.k_proj.weight"]
        out[blk + "attn_q.weight"] = permute_rope_rows(q, c.num_attention_heads)
        out[blk + "attn_k.weight"] = permute_rope_rows(k, c.num_key_value_heads)
        out[blk + "attn_v.weight"] = sd[hf + "self_attn.v_proj.weight"]
        out[blk + "attn_output.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[blk + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[blk + "ffn_gate.weight"] = sd[hf + "mlp.gate_proj.weight"]
        out[blk + "ffn_up.weight"] = sd[hf + "mlp.up_proj.weight"]
        out[blk + "ffn_down.weight"] = sd[hf + "mlp.down_proj.weight"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def q8_0_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """What a float32 matrix becomes after Q8_0 quantization and dequantization."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = np.ascontiguousarray(weight.detach().numpy(), dtype=np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape))


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE (ChatML specials 0-2, 256 bytes, merges learned on a tiny text), with ChatML's
    chat template; bos <|im_start|>, eos = pad <|im_end|>, unk <|endoftext|>, like SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
    )


def tiny_llama(vocab_size: int, tied: bool = False, seed: int = 0):
    """A random 2-layer Llama (d 64, 4 heads / 2 KV heads), float32, eval mode; the norm weights are
    random too, so a mix-up of norms shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p)
            )
    return model


def write_llama_gguf(
    path, model, tokenizer, q8_0=(), architecture="llama", rope_scaling=None, extra_tensors=None
):
    """Write `model` + `tokenizer` as a llama.cpp-style GGUF; `q8_0`: GGUF tensor names stored as Q8_0
    (rows a multiple of 32). For the error tests: another `architecture`, a `rope_scaling` type
    ("linear", "yarn") in the metadata, `extra_tensors` ({name: array}) added to, or replacing, the
    llama's (an array's dtype sets the tensor's type)."""
    c = model.config
    tensors = gguf_tensors(model) | (extra_tensors or {})
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = dict(backend["model"]["vocab"]) | {t["content"]: t["id"] for t in backend["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) == list(range(c.vocab_size))
    control = {t["content"] for t in backend["added_tokens"] if t["special"]}
    types = [int(gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    add_llama_header(
        w, context=c.max_position_embeddings, dim=c.hidden_size, n_layers=c.num_hidden_layers,
        ffn_dim=c.intermediate_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
        rope_theta=c.rope_parameters["rope_theta"], norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
    )  # fmt: skip
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        w.add_rope_scaling_factor(2.0)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_unk_token_id(tokenizer.unk_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    write_tensors(w, tensors, lambda name, t: gguf.GGMLQuantizationType.Q8_0 if name in q8_0 else None)
    return path
