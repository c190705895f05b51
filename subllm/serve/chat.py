"""The OpenAI chat completions wire format (/v1/chat/completions): messages are checked, rendered
through the checkpoint's chat template (the tokenizer's `apply_chat_template`, read from the
folder's chat_template.jinja or the "chat_template" of its tokenizer_config.json) and tokenized;
from there a chat request is a completions request - the same settings, checks, limits and
batcher (protocol.py `parse_completion`). Responses are `chat.completion` and, streamed,
`chat.completion.chunk` (a first chunk with the role, then content deltas, then the finish reason).
https://platform.openai.com/docs/api-reference/chat

Messages: a list of {"role", "content"} objects (optional "name"); roles system, developer, user and
assistant; content a string or a list of {"type": "text", "text"} parts (joined with newlines, as
vLLM does). Tool calling and images are not supported (400). The rendered text is tokenized without
adding special tokens (the template writes them), as `apply_chat_template(tokenize=True)` does.
`max_tokens` / `max_completion_tokens` default to the rest of the context (as OpenAI and vLLM);
`logprobs: true` with `top_logprobs` returns OpenAI's chat logprobs (not with stream).
"""

from __future__ import annotations

from subllm.serve.protocol import MAX_LOGPROBS, APIError, Completion, _is_int, check_model, parse_completion

ROLES = ("system", "developer", "user", "assistant")
# message keys accepted only when null: clients send an earlier reply back as it came (model_dump())
NULL_KEYS = ("tool_calls", "function_call", "refusal", "audio", "annotations")
# passed through to the completions checks unchanged
SHARED = (
    "model", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "stream",
    "stream_options", "ignore_eos", "user", "n", "presence_penalty", "frequency_penalty", "logit_bias",
)  # fmt: skip
KNOWN = {*SHARED, "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"}


def parse_chat(body, tokenizer, vocab_size: int, max_seq_len: int, model_name: str) -> Completion:
    """Check a decoded chat body; -> the rendered prompt's ids and the generation settings, or raise
    APIError (400 for a checkpoint without a chat template)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "this model has no chat template (its checkpoint folder holds no chat_template.jinja and "
            'no "chat_template" in tokenizer_config.json), so /v1/chat/completions cannot render '
            "messages; use /v1/completions with a prompt",
            None,
            "chat_template_missing",
        )
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise APIError(400, f"unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    check_model(body.get("model"), model_name)
    messages = check_messages(body.get("messages"))

    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise APIError(400, f"logprobs must be true or false, got {logprobs!r}", "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}] (this server's "
                           f"cap), got {top!r}", "top_logprobs")  # fmt: skip
        if not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
    max_tokens = a if a is not None else b

    ids = render(tokenizer, messages)
    if len(ids) >= max_seq_len:
        raise APIError(
            400,
            f"this model's maximum context length is {max_seq_len} tokens; the messages take {len(ids)} "
            "tokens through the chat template (room for no new token)",
            "messages",
            "context_length_exceeded",
        )
    comp = {k: body[k] for k in SHARED if k in body}
    comp["prompt"] = ids
    comp["max_tokens"] = max_seq_len - len(ids) if max_tokens is None else max_tokens
    if logprobs:
        comp["logprobs"] = top or 0
    return parse_completion(comp, tokenizer, vocab_size, max_seq_len, model_name)


def check_messages(messages) -> list[dict]:
    """-> the messages as the template gets them (content always a string), or raise a 400."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, 'messages must be a non-empty list of {"role", "content"} objects', "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", "messages")
        role = m.get("role")
        if role == "tool" or m.get("tool_calls") is not None or m.get("function_call") is not None:
            raise APIError(400, f"{where}: tool calling is not supported by this server", "messages")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages")
        extra = sorted(set(m) - {"role", "content", "name", *NULL_KEYS})
        if extra:
            raise APIError(400, f"{where}: unrecognized message field {extra[0]!r}", "messages")
        bad = [k for k in NULL_KEYS if m.get(k) is not None]
        if bad:
            raise APIError(400, f"{where}.{bad[0]} is not supported by this server", "messages")
        msg = {"role": role, "content": _content(m.get("content"), where)}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise APIError(400, f"{where}.name must be a string", "messages")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(text, str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": "
                               f"\"...\"}}) are supported, got {kind!r}", "messages")  # fmt: skip
            if set(part) - {"type", "text"}:
                raise APIError(400, f"{where}.content: a text part has only type and text", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"{where}.content must be a string or a non-empty list of text parts", "messages")


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The messages through the chat template, with the assistant's turn opened, as token ids."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # the template's own raise_exception (e.g. roles must alternate)
        raise APIError(400, f"the chat template refused these messages: {e}", "messages") from None
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise APIError(400, "the messages render to an empty prompt", "messages")
    return ids


# ---- responses --------------------------------------------------------------------------------
def chat_logprobs(lp: dict | None) -> dict | None:
    """The completions logprobs record (protocol: tokens, token_logprobs, top_logprobs) -> OpenAI's
    chat format {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}."""
    if lp is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for token, logprob, tops in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in tops.items()]})
    return {"content": content, "refusal": None}


class ChatShape:
    """chat.completion bodies and chat.completion.chunk events (app.py writes them)."""

    prefix = "chatcmpl"

    @staticmethod
    def _chunk(cid: str, model: str, created: int, choices: list[dict], null_usage: bool) -> dict:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": choices}  # fmt: skip
        if null_usage:
            out["usage"] = None
        return out

    def start(self, cid, model, created, i, null_usage) -> dict:
        delta = {"role": "assistant", "content": ""}
        return self._chunk(cid, model, created, [_delta(i, delta)], null_usage)

    def delta(self, cid, model, created, i, text, null_usage) -> dict:
        return self._chunk(cid, model, created, [_delta(i, {"content": text})], null_usage)

    def end(self, cid, model, created, i, reason, null_usage) -> dict:
        return self._chunk(cid, model, created, [_delta(i, {}, reason)], null_usage)

    def usage(self, cid, model, created, usage) -> dict:
        return {**self._chunk(cid, model, created, [], False), "usage": usage}

    def body(self, cid, model, created, texts: list[str], finals: list[dict], usage: dict) -> dict:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": chat_logprobs(f["logprobs"]),
                "finish_reason": f["finish_reason"],
            }
            for i, (t, f) in enumerate(zip(texts, finals))
        ]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage}  # fmt: skip


def _delta(i: int, delta: dict, reason: str | None = None) -> dict:
    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
