"""Request bodies under limits: size, time, JSON depth and valid Unicode (each a 4xx, never a 500).

`read_body` refuses a body over `max_bytes` with 413 as soon as it knows: from Content-Length
before reading any of it, or - for a chunked body - at the first chunk that crosses the limit, so
memory never holds more than the limit; a body that does not arrive within `timeout` seconds is a
408. `decode_json` (run off the event loop) refuses NaN / Infinity, nesting deeper than
`MAX_DEPTH` and strings with lone surrogates ("\\ud800": valid JSON, but not Unicode that a
tokenizer or a UTF-8 encoder accepts).
"""

from __future__ import annotations

import asyncio
import json

from subllm.serve.protocol import APIError

MAX_DEPTH = 32


class BodyTooLarge(APIError):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than the server's limit of {max_bytes} bytes "
                         "(--max-body-bytes)", None, "request_too_large")  # fmt: skip


async def read_body(request, max_bytes: int, timeout: float) -> bytes:
    """The whole body of a Starlette request, or raise APIError (413, 408, 400)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"bad Content-Length header: {length!r}")
        if int(length) > max_bytes:
            raise BodyTooLarge(max_bytes)
    parts, n = [], 0

    async def read() -> None:
        nonlocal n
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_bytes:
                raise BodyTooLarge(max_bytes)
            parts.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(parts)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes):
    """Parse a JSON body; -> the object, or raise a 400 APIError saying what is wrong."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    check_tree(body)
    return body


def check_tree(body) -> None:
    """Depth <= MAX_DEPTH and no lone surrogate in any string or key (iterative: no recursion)."""
    stack = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if not isinstance(node, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise APIError(400, f"the request body is nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            for key, value in node.items():
                _check_text(key)
                stack.append((value, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in node if isinstance(v, str | dict | list))


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start : e.end].encode("unicode_escape").decode("ascii")
        raise APIError(400, f"the request holds a lone surrogate ({bad}): not valid Unicode") from None
