"""`--api-key`: every route but the open ones needs `Authorization: Bearer KEY` (an ASGI middleware).

Without it the answer is 401 in OpenAI's error format (code "invalid_api_key") with
`WWW-Authenticate: Bearer`. Open without a key: /health (load balancers' probes), /metrics
(Prometheus scrapers) and /version - none of them runs the model or shows a request's text. The
key is compared in constant time.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from subllm.serve.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


class APIKeyMiddleware:
    def __init__(self, app, key: str, metrics=None):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if self.metrics is not None:
            self.metrics.add_rejected(401)
        body = error_body(
            "missing or incorrect API key: send the header 'Authorization: Bearer <key>' "
            "(subllm serve --api-key)",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
