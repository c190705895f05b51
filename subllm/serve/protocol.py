"""The OpenAI completions wire format: request checks (-> a 4xx APIError with a clear message) and
response bodies. https://platform.openai.com/docs/api-reference/completions

Supported: prompt (text, token ids, or a list of them: one choice per prompt), max_tokens (0 only
with echo), temperature (below 1e-5: greedy, as vLLM), top_p, stop, seed, stream,
stream_options.include_usage, echo, logprobs (up to MAX_LOGPROBS alternatives; not with stream),
n = 1 and the neutral values of the rest; plus the common extensions top_k, repetition_penalty and
ignore_eos (as in vLLM). Unknown fields are refused (as OpenAI does), so a typo never silently
changes nothing. Values that could not give a probability distribution (a temperature or a
repetition penalty so small that the scaled logits overflow) are refused, not sampled from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from subllm.errors import SubLLMError
from subllm.inference.generation import validate_sampling
from subllm.serve.request import Settings

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4
MAX_STOP_CHARS = 256  # per stop string (each generated token is checked against its prefixes)
MAX_LOGPROBS = 20  # vLLM's default cap
MAX_PROMPTS = 256  # prompts in one request (each takes a queue slot)
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (vLLM)
PENALTY_RANGE = (0.01, 100.0)  # repetition_penalty: beyond these logits can overflow float32


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        if self.status == 503:
            return "service_unavailable"
        return "invalid_request_error" if 400 <= self.status < 500 else "server_error"

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Completion:
    prompts: list[list[int]]  # one choice per prompt
    texts: list[str | None]  # each prompt as sent (text prompts), for echo
    settings: Settings
    stream: bool
    include_usage: bool


NEUTRAL = {  # accepted only with these values
    "n": (None, 1),
    "best_of": (None, 1),
    "suffix": (None,),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None,),
}
KNOWN = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
    "seed", "stream", "stream_options", "ignore_eos", "user", "echo", "logprobs", *NEUTRAL,
}  # fmt: skip


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_model(model, model_name: str) -> None:
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")  # fmt: skip


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
    check_model(body.get("model"), model_name)
    if "user" in body and not isinstance(body["user"], str | None):
        raise APIError(400, "user must be a string", "user")

    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"echo must be true or false, got {echo!r}", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise APIError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the number of alternatives "
                       f"returned per token; this server's cap is {MAX_LOGPROBS}), got {logprobs!r}",
                       "logprobs")  # fmt: skip
    prompts, texts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    T = max(map(len, prompts))
    if T >= max_seq_len + (1 if echo else 0):
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
    elif not _is_int(max_tokens) or max_tokens < (0 if echo else 1):
        rule = ">= 0 (0: the prompt's logprobs only) with echo" if echo else ">= 1 (0 only with echo)"
        raise APIError(400, f"max_tokens must be an integer {rule}, got {max_tokens!r}", "max_tokens")
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
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    top_p = body.get("top_p")
    if top_p is not None and (not _is_num(top_p) or not 0 < top_p <= 1):
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or (top_k < 1 and top_k != -1)):
        raise APIError(400, f"top_k must be an integer >= 1 (-1 or null = off), got {top_k!r}", "top_k")
    penalty = body.get("repetition_penalty")
    lo, hi = PENALTY_RANGE
    if penalty is not None and (not _is_num(penalty) or not lo <= penalty <= hi):
        raise APIError(400, f"repetition_penalty must be a number in [{lo:g}, {hi:g}] (1 = off), "
                       f"got {penalty!r}", "repetition_penalty")  # fmt: skip
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise APIError(400, f"seed must be an integer in [0, 2^63), got {seed!r}", "seed")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", "stop")
    if any(len(x) > MAX_STOP_CHARS for x in stop):
        raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
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
    if stream and logprobs is not None:
        raise APIError(400, "logprobs with stream=true is not supported by this server; ask without stream",
                       "logprobs")  # fmt: skip
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
        logprobs=logprobs,
        echo=bool(echo),
    )
    try:  # the library's own checks, as a backstop
        validate_sampling(max_tokens, settings.temperature, settings.top_k, settings.top_p,
                          settings.repetition_penalty, seed)  # fmt: skip
    except SubLLMError as e:
        raise APIError(400, str(e)) from None
    return Completion(prompts, texts, settings, bool(stream), bool(opts and opts.get("include_usage")))


def _prompts(prompt, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str | None]]:
    """One prompt (text or token ids) or a list of them -> (ids per prompt, text per prompt)."""
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
        ids = [_prompt_ids(p, tokenizer, vocab_size) for p in prompt]
        return ids, [p if isinstance(p, str) else None for p in prompt]
    return [_prompt_ids(prompt, tokenizer, vocab_size)], [prompt if isinstance(prompt, str) else None]


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[int]:
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
        if not all(_is_int(t) for t in prompt):
            raise APIError(400, "prompt must be a string or a list of integer token ids", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a string or a list of integer token ids", "prompt")


# ---- responses --------------------------------------------------------------------------------
def choice(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(cid: str, model: str, choices: list[dict], usage: dict | None, null_usage=False,
                    created: int | None = None) -> dict:  # fmt: skip
    """A completion, or a stream chunk (usage None; `null_usage`: "usage": null, as OpenAI sends
    each chunk before the usage chunk when the client asked for one)."""
    created = int(time.time()) if created is None else created
    out = {"id": cid, "object": "text_completion", "created": created, "model": model,
           "choices": choices}  # fmt: skip
    if usage is not None or null_usage:
        out["usage"] = usage
    return out


def usage_chunk(cid: str, model: str, usage: dict, created: int | None = None) -> dict:
    return completion_body(cid, model, [], usage, created=created)


class TextShape:
    """text_completion bodies and stream chunks (app.py writes them; chat.py has `ChatShape`)."""

    prefix = "cmpl"

    def start(self, cid, model, created, i, null_usage) -> None:
        return None  # a completions stream opens with its first text

    def delta(self, cid, model, created, i, text, null_usage) -> dict:
        return completion_body(cid, model, [choice(i, text)], None, null_usage, created)

    def end(self, cid, model, created, i, reason, null_usage) -> dict:
        return completion_body(cid, model, [choice(i, "", reason)], None, null_usage, created)

    def usage(self, cid, model, created, usage) -> dict:
        return usage_chunk(cid, model, usage, created)

    def body(self, cid, model, created, texts: list[str], finals: list[dict], usage: dict) -> dict:
        pairs = enumerate(zip(texts, finals))
        choices = [choice(i, t, f["finish_reason"], f["logprobs"]) for i, (t, f) in pairs]
        return completion_body(cid, model, choices, usage, created=created)


def add_usage(total: dict | None, usage: dict) -> dict:
    if total is None:
        return dict(usage)
    return {k: total[k] + usage[k] for k in total}


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
