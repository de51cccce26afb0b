"""Configurable request limits, enforced at the gateway before any stage is involved (all -> 400).

``gateway.max_prompt_bytes``: the HTTP body (and gRPC prompt text) size; ``gateway.max_prompt_tokens`` and
``gateway.max_output_tokens``: per-request caps below the model's context (0 = only the context limits).
Images per request are limited by the encoder settings (``encoder.max_images_per_request``).
"""

from __future__ import annotations

import json
from typing import Any

from stageserve.serving.common.config import GatewayConfig
from stageserve.serving.common.errors import BadRequest


def check_tokens(prompt_tokens: int, max_tokens: int, cfg: GatewayConfig) -> None:
    if cfg.max_prompt_tokens and prompt_tokens > cfg.max_prompt_tokens:
        raise BadRequest(
            f"prompt: {prompt_tokens} tokens, more than this deployment's limit of {cfg.max_prompt_tokens}",
            field="prompt",
        )
    if cfg.max_output_tokens and max_tokens > cfg.max_output_tokens:
        raise BadRequest(
            f"max_tokens: {max_tokens} is more than this deployment's limit of {cfg.max_output_tokens}",
            field="max_tokens",
        )


class BodyLimit:
    """ASGI middleware: an HTTP request body over ``limit`` bytes gets a 400 naming the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._reject(send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Any) -> None:
        payload = json.dumps({"error": {
            "message": f"body: request body larger than this deployment's limit of {self.limit} bytes",
            "type": "invalid_request_error", "param": "body", "code": None,
        }}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
