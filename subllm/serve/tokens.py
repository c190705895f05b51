"""/tokenize and /detokenize (vLLM's shape), so a client can count and check tokens with the
server's own tokenizer. Both run on the app's tokenizer threads, never on the event loop.

    POST /tokenize    {"prompt": "text"}     -> {"tokens": [ids], "count": n, "max_model_len": L}
    POST /detokenize  {"tokens": [ids]}      -> {"prompt": "text"}
"""

from __future__ import annotations

from subllm.serve.protocol import APIError, _is_int, check_model


def tokenize(body, tokenizer, max_seq_len: int, model_name: str) -> dict:
    _check(body, {"model", "prompt", "add_special_tokens"}, model_name)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string", "prompt")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise APIError(400, "add_special_tokens must be true or false", "add_special_tokens")
    ids = list(tokenizer(prompt, add_special_tokens=special)["input_ids"])
    return {"tokens": ids, "count": len(ids), "max_model_len": max_seq_len}


def detokenize(body, tokenizer, vocab_size: int, model_name: str) -> dict:
    _check(body, {"model", "tokens"}, model_name)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise APIError(400, "tokens must be a list of integer token ids", "tokens")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(ids)}


def _check(body, known: set[str], model_name: str) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    check_model(body.get("model"), model_name)
