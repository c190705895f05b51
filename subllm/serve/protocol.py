"""The OpenAI completions wire format: request checks (-> a 4xx APIError with a clear message) and
response bodies. https://platform.openai.com/docs/api-reference/completions

Supported: prompt (text, token ids, or a list holding one of them), max_tokens, temperature, top_p,
stop, seed, stream, stream_options.include_usage, n = 1 and the neutral values of the rest; plus
the common extensions top_k, repetition_penalty and ignore_eos (as in vLLM). Unknown fields are
refused (as OpenAI does), so a typo never silently changes nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from subllm.errors import SubLLMError
from subllm.inference.generation import validate_sampling
from subllm.serve.batcher import Settings

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            404: "invalid_request_error",
            429: "rate_limit_error",
            503: "service_unavailable",
        }.get(self.status, "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Completion:
    prompt: list[int]
    settings: Settings
    stream: bool
    include_usage: bool


NEUTRAL = {  # accepted only with these values
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None,),
    "suffix": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None,),
}
KNOWN = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
    "seed", "stream", "stream_options", "ignore_eos", "user", *NEUTRAL,
}  # fmt: skip


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_completion(body, tokenizer, vocab_size: int, max_seq_len: int, model_name: str) -> Completion:
    """Check a decoded JSON body; -> the prompt ids and generation settings, or raise APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise APIError(400, f"unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for key, allowed in NEUTRAL.items():
        v = body.get(key)
        if not any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed) and (key, v) != (
            "logit_bias",
            {},
        ):
            raise APIError(400, f"{key}={v!r} is not supported by this server (only {allowed[-1]!r})", key)
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")  # fmt: skip
    if "user" in body and not isinstance(body["user"], str | None):
        raise APIError(400, "user must be a string", "user")

    prompt = _prompt_ids(body.get("prompt"), tokenizer, vocab_size)
    T = len(prompt)
    if T >= max_seq_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_seq_len} tokens; the prompt has {T} tokens "
            "(room for no new token)",
            "prompt",
            "context_length_exceeded",
        )
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, max_seq_len - T)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    elif T + max_tokens > max_seq_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_seq_len} tokens; you requested {T + max_tokens} "
            f"({T} in the prompt, {max_tokens} for the completion)",
            "max_tokens",
            "context_length_exceeded",
        )

    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_num(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2] (0 = greedy), got {temperature!r}",
                       "temperature")  # fmt: skip
    top_p = body.get("top_p")
    if top_p is not None and (not _is_num(top_p) or not 0 < top_p <= 1):
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or (top_k < 1 and top_k != -1)):
        raise APIError(400, f"top_k must be an integer >= 1 (-1 or null = off), got {top_k!r}", "top_k")
    penalty = body.get("repetition_penalty")
    if penalty is not None and (not _is_num(penalty) or penalty <= 0):
        raise APIError(400, f"repetition_penalty must be a number > 0 (1 = off), got {penalty!r}",
                       "repetition_penalty")  # fmt: skip
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise APIError(400, f"seed must be an integer in [0, 2^63), got {seed!r}", "seed")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (
        not isinstance(opts, dict)
        or set(opts) - {"include_usage"}
        or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise APIError(400, 'stream_options must be {"include_usage": true|false}', "stream_options")
    if opts is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")

    settings = Settings(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_k=None if top_k in (None, -1) else top_k,
        top_p=None if top_p in (None, 1) else float(top_p),
        repetition_penalty=None if penalty in (None, 1) else float(penalty),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=bool(ignore_eos),
    )
    try:  # the library's own checks, as a backstop
        validate_sampling(max_tokens, settings.temperature, settings.top_k, settings.top_p,
                          settings.repetition_penalty, seed)  # fmt: skip
    except SubLLMError as e:
        raise APIError(400, str(e)) from None
    return Completion(prompt, settings, bool(stream), bool(opts and opts.get("include_usage")))


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids:
            raise APIError(400, "prompt is empty after tokenization", "prompt")
        return ids
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        if all(isinstance(p, str | list) for p in prompt):
            raise APIError(400, f"one prompt per request (n = 1); got {len(prompt)}", "prompt")
        if not all(_is_int(t) for t in prompt):
            raise APIError(400, "prompt must be a string or a list of integer token ids", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a string or a list of integer token ids", "prompt")


# ---- responses --------------------------------------------------------------------------------
def completion_body(cid: str, model: str, text: str, finish_reason: str | None, usage: dict | None) -> dict:
    out = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def usage_chunk(cid: str, model: str, usage: dict) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}  # fmt: skip


def models_body(model: str, max_seq_len: int, created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "subllm",
                "max_model_len": max_seq_len,
            }
        ],
    }
