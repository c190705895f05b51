"""Our SubLLM converted from a GGUF (`subllm convert --from-gguf`) against transformers' own loading of
the same GGUF (`LlamaForCausalLM.from_pretrained(dir, gguf_file=...)`): token ids, chat-template text
and max |logit diff| on a few prompts. A table, then one JSON line.

    python benchmarks/gguf_parity.py --gguf data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --checkpoint runs/smollm2
"""

import argparse
import json
import time

import torch

from subllm.data.tokenizer import load_tokenizer
from subllm.hf.gguf import load_gguf_llama
from subllm.model.subllm import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--checkpoint", required=True, help="the SubLLM folder converted from --gguf")
    p.add_argument("--text", default="README.md", help="a file whose first --chars characters are a prompt")
    p.add_argument("--chars", type=int, default=2500)
    a = p.parse_args()

    t = time.perf_counter()
    oracle, gguf_tok = load_gguf_llama(a.gguf)
    load_s = time.perf_counter() - t
    model, tok = load_model(a.checkpoint), load_tokenizer(a.checkpoint)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = gguf_tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    same_chat = chat == tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    prompts = {
        "plain": "The capital of France is",
        "chat": chat,
        "code": "def fib(n):\n    if n < 2:\n        return n\n    return",
        "passage": open(a.text, encoding="utf-8").read()[: a.chars],
    }
    rows = {}
    print(f"{'prompt':8s} {'tokens':>6s} {'same ids':>8s} {'max|dlogit|':>11s} {'max|logit|':>10s} next")
    for name, text in prompts.items():
        ids = gguf_tok(text, return_tensors="pt").input_ids  # (1, T)
        with torch.no_grad():
            ours, theirs = model(ids).logits, oracle(ids).logits  # (1, T, V)
        rows[name] = {
            "tokens": ids.shape[1],
            "same_ids": tok(text).input_ids == ids[0].tolist(),
            "max_abs_logit_diff": (ours - theirs).abs().max().item(),
            "max_abs_logit": theirs.abs().max().item(),
            "argmax_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "next": tok.decode(int(ours[0, -1].argmax())),
        }
        r = rows[name]
        print(
            f"{name:8s} {r['tokens']:6d} {str(r['same_ids']):>8s} {r['max_abs_logit_diff']:11.3g} "
            f"{r['max_abs_logit']:10.1f} {r['next']!r}"
        )
    out = {"gguf": a.gguf, "checkpoint": a.checkpoint, "transformers_gguf_load_s": round(load_s, 1)}
    out |= {"same_chat_text": same_chat, "threads": torch.get_num_threads(), "prompts": rows}
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
