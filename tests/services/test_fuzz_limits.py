"""Configurable request limits -> 400 naming the limit (gateway/limits.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from stageserve.serving.common.config import GatewayConfig
from stageserve.serving.common.errors import BadRequest
from stageserve.serving.gateway.limits import BodyLimit, check_tokens


async def _echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _post(content, headers=None):
    async def main():
        transport = httpx.ASGITransport(app=BodyLimit(_echo, 100))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/completions", content=content, headers=headers)

    return asyncio.run(main())


def test_body_over_the_limit_is_400_naming_it():
    ok = _post(b"x" * 100)
    assert ok.status_code == 200 and ok.text == "100"
    big = _post(b"x" * 101)
    assert big.status_code == 400
    assert big.json()["error"]["param"] == "body" and "100 bytes" in big.json()["error"]["message"]

    async def chunks():
        for _ in range(5):
            yield b"y" * 30  # no content-length: counted as it streams in

    assert _post(chunks()).status_code == 400


def test_token_limits():
    cfg = GatewayConfig(max_prompt_tokens=10, max_output_tokens=5)
    check_tokens(10, 5, cfg)
    with pytest.raises(BadRequest, match="prompt: 11 tokens"):
        check_tokens(11, 5, cfg)
    with pytest.raises(BadRequest, match="max_tokens: 6"):
        check_tokens(3, 6, cfg)
    check_tokens(10**6, 10**6, GatewayConfig())  # 0 = only the model's context applies
