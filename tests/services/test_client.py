"""The stageserve.client SDK against the real pipeline (all five stages as processes), plus retry rules
checked against a scripted in-process gateway where the real one cannot be made to fail on cue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from stageserve.client import (
    AsyncClient,
    Client,
    Completion,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    Stream,
    Unavailable,
)
from stageserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PROMPT = "The capital of France is"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(pipeline: Any) -> Iterator[Client]:
    with Client(pipeline.gateway_grpc, user="sdk-test", app="tests", timeout=120.0) as c:
        yield c


def _complete(result: Completion | Stream) -> Completion:
    assert isinstance(result, Completion)
    return result


def _stream(result: Completion | Stream) -> Stream:
    assert isinstance(result, Stream)
    return result


# ---- the real pipeline --------------------------------------------------------------------------------
def test_models(client: Client) -> None:
    models = client.models()
    assert len(models) == 1
    model_id, max_context = models[0]
    assert model_id and max_context > 0
    out = _complete(client.generate(PROMPT, model=model_id, max_tokens=4))
    assert out.usage.completion_tokens == len(out.token_ids) > 0


def test_generate_greedy_length(client: Client) -> None:
    out = _complete(client.generate(PROMPT, max_tokens=8, ignore_eos=True))
    assert out.text
    assert len(out.token_ids) == 8
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == len(out.token_ids) == 8
    assert out.usage.prompt_tokens > 0
    assert out.request_id
    assert out.interaction_id  # minted by the gateway


def test_stream_matches_non_streaming(client: Client) -> None:
    whole = _complete(client.generate(PROMPT, max_tokens=12, ignore_eos=True))
    with _stream(client.generate(PROMPT, max_tokens=12, ignore_eos=True, stream=True)) as stream:
        events = list(stream)
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.token_ids
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    last = events[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert all(e.usage is None for e in events[:-1])
    assert stream.interaction_id and stream.attempts == 1


def test_token_id_prompt(client: Client) -> None:
    text = _complete(client.generate(PROMPT, max_tokens=6, ignore_eos=True))
    ids = _complete(client.generate(text.token_ids, max_tokens=2, ignore_eos=True))
    assert ids.usage.prompt_tokens == len(text.token_ids)
    assert len(ids.token_ids) == 2


def test_chat(client: Client) -> None:
    out = _complete(client.chat(HELLO, max_tokens=12))
    assert out.text.strip()
    assert out.usage.completion_tokens == len(out.token_ids) <= 12
    assert out.finish_reason in ("stop", "length")
    with _stream(client.chat(HELLO, max_tokens=12, stream=True)) as stream:
        assert "".join(e.text for e in stream) == out.text


def test_interaction_id_minted_and_echoed(client: Client) -> None:
    first = _complete(client.generate(PROMPT, max_tokens=2))
    second = _complete(client.generate(PROMPT, max_tokens=2))
    assert first.interaction_id and second.interaction_id and first.interaction_id != second.interaction_id
    out = _complete(client.generate(PROMPT, max_tokens=2, interaction_id="sdk-interaction-42", call_index=3))
    assert out.interaction_id == "sdk-interaction-42"
    with _stream(client.chat(HELLO, max_tokens=2, interaction_id="sdk-interaction-42", stream=True)) as stream:
        assert stream.interaction_id == "sdk-interaction-42"
        list(stream)
        assert stream.interaction_id == "sdk-interaction-42"


def test_kv_format_override(client: Client) -> None:
    for fmt in ("fp8", "bf16"):
        out = _complete(client.generate(PROMPT, max_tokens=8, ignore_eos=True, kv_format=fmt))
        assert len(out.token_ids) == out.usage.completion_tokens == 8, fmt
        assert out.text, fmt


def test_invalid_requests_then_good_call(client: Client) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": PROMPT, "temperature": -1.0}, "temperature"),
        ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),  # caught by the client (0 means 16 on the wire)
        ({"prompt": PROMPT, "kv_format": "nope"}, "kv_format"),
    ]
    for kwargs, field_name in cases:
        with pytest.raises(InvalidRequest) as info:
            client.generate(**kwargs)
        err = info.value
        assert field_name in err.details, (kwargs, err.details)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.attempts == 1
    with pytest.raises(InvalidRequest, match="messages"):
        client.chat([{"role": "wizard", "content": "hi"}])
    out = _complete(client.generate(PROMPT, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_unknown_model(client: Client) -> None:
    with pytest.raises(ModelNotFound) as info:
        client.generate(PROMPT, model="no-such-model", max_tokens=2)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details
    with pytest.raises(ModelNotFound):
        client.chat(HELLO, model="no-such-model", max_tokens=2)


def test_stream_closed_early_then_next_call(client: Client) -> None:
    stream = _stream(client.generate(PROMPT, max_tokens=16, ignore_eos=True, stream=True))
    first = next(stream)
    assert first.token_ids and not first.finished
    stream.close()
    out = _complete(client.generate(PROMPT, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_async_concurrent_streams(pipeline: Any) -> None:
    async def one(c: AsyncClient, i: int) -> tuple[list[int], str, str | None]:
        stream = await c.generate(f"{PROMPT} number {i}:", max_tokens=8, ignore_eos=True, stream=True)
        ids: list[int] = []
        reason = None
        async with stream:
            async for event in stream:
                ids.extend(event.token_ids)
                if event.finished:
                    reason = event.finish_reason
                    assert event.usage is not None and event.usage.completion_tokens == 8
        return ids, reason or "", stream.interaction_id

    async def main() -> None:
        async with AsyncClient(pipeline.gateway_grpc, user="sdk-async", timeout=300.0) as c:
            results = await asyncio.gather(*(one(c, i) for i in range(32)))
            assert all(len(ids) == 8 and reason == "length" and iid for ids, reason, iid in results)
            out = await c.chat(HELLO, max_tokens=4)
            assert isinstance(out, Completion) and out.text
            assert (await c.models())[0].max_context > 0
            with pytest.raises(InvalidRequest, match="temperature"):
                await c.generate(PROMPT, temperature=-1.0)
            with pytest.raises(ModelNotFound):
                await c.generate(PROMPT, model="no-such-model")

    asyncio.run(main())


# ---- retries ------------------------------------------------------------------------------------------
def test_unreachable_retries_then_unavailable() -> None:
    with Client("127.0.0.1:1", max_retries=2, backoff_s=0.01) as c:
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            c.generate(PROMPT, max_tokens=2)
        assert info.value.attempts == 3
        assert time.monotonic() - start >= 0.01  # at least the first backoff (0.005..0.015 s) + the second
        with pytest.raises(Unavailable) as info:
            c.models()
        assert info.value.attempts == 3
        stream = _stream(c.generate(PROMPT, stream=True))
        with pytest.raises(Unavailable):
            list(stream)
        assert stream.attempts == 3

    async def main() -> None:
        async with AsyncClient("127.0.0.1:1", max_retries=2, backoff_s=0.01) as c:
            with pytest.raises(Unavailable) as info:
                await c.generate(PROMPT, max_tokens=2)
            assert info.value.attempts == 3

    asyncio.run(main())


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    """Fails the first `failures` calls with `code` (after `tokens_first` events), then answers one token."""

    def __init__(self, code: grpc.StatusCode, failures: int, tokens_first: int = 0) -> None:
        self.code, self.failures, self.tokens_first = code, failures, tokens_first
        self.calls = 0
        self.metadata: list[dict[str, str]] = []

    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if self.calls <= self.failures:
            for i in range(self.tokens_first):
                yield common_pb2.TokenEvent(request_id="r", token_ids=[i], text="x")
            context.set_trailing_metadata((("retry-after", "0.05"),))
            context.abort(self.code, "scripted failure")
        event = common_pb2.TokenEvent(request_id="r", token_ids=[7], text="ok", finished=True, finish_reason="length")
        event.usage.CopyFrom(common_pb2.Usage(prompt_tokens=1, completion_tokens=1))
        yield event


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(servicer: ScriptedGateway) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_before_output_is_retried(scripted: Any) -> None:
    gateway = ScriptedGateway(grpc.StatusCode.UNAVAILABLE, failures=2)
    with Client(scripted(gateway), max_retries=3, backoff_s=0.01, user="u", api_key="k") as c:
        out = _complete(c.generate("hi"))
    assert out.text == "ok" and gateway.calls == 3
    assert gateway.metadata[0]["authorization"] == "Bearer k"
    assert gateway.metadata[0]["x-stageserve-user"] == "u"


def test_stream_with_output_is_never_replayed(scripted: Any) -> None:
    gateway = ScriptedGateway(grpc.StatusCode.UNAVAILABLE, failures=1, tokens_first=2)
    with Client(scripted(gateway), max_retries=3, backoff_s=0.01) as c:
        with pytest.raises(Unavailable) as info:
            c.generate("hi")
    assert gateway.calls == 1 and info.value.attempts == 1


def test_overload_retried_only_when_asked(scripted: Any) -> None:
    gateway = ScriptedGateway(grpc.StatusCode.RESOURCE_EXHAUSTED, failures=1)
    address = scripted(gateway)
    with Client(address, max_retries=3, backoff_s=0.01) as c:
        with pytest.raises(Overloaded) as info:
            c.generate("hi")
    assert info.value.retry_after_s == pytest.approx(0.05) and gateway.calls == 1
    gateway.calls = 0
    with Client(address, max_retries=3, backoff_s=0.01, retry_on_overload=True) as c:
        start = time.monotonic()
        out = _complete(c.generate("hi"))
    assert out.text == "ok" and gateway.calls == 2
    assert time.monotonic() - start >= 0.05  # waited retry-after
