"""The gateway's OpenAI HTTP API, served by uvicorn over a real in-process engine and called with the
official ``openai`` client (and raw httpx where the client cannot send what we want to test)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from stageserve.core.sampling import SamplingParams
from stageserve.engine.async_engine import AsyncEngine
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.serving.common.errors import Overloaded
from stageserve.serving.gateway.http import GenerateDelta, HttpGenerateRequest, create_app

pytestmark = pytest.mark.model

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


class EngineBackend:
    """GenerateBackend over an AsyncEngine in this process (what the gateway core does over gRPC)."""

    def __init__(self, loaded: Any) -> None:
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.max_context = loaded.config.max_position_embeddings
        self.engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=256), loaded))
        self.requests: list[HttpGenerateRequest] = []
        self.closed_early: set[str] = set()  # request ids whose generator was closed before the last delta
        self.fail_next: Exception | None = None  # raised by the next generate() before any output

    def tokenize_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tokenize_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja errors on malformed conversations
            raise ValueError(str(exc)) from exc
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def generate(self, request: HttpGenerateRequest) -> AsyncIterator[GenerateDelta]:
        self.requests.append(request)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        completion, finished = 0, False
        events = self.engine.generate(request.request_id, request.prompt_token_ids, request.params)
        try:
            async with aclosing(events):
                async for ev in events:
                    completion += len(ev.token_ids)
                    finished = ev.finished
                    yield GenerateDelta(
                        ev.text,
                        ev.token_ids,
                        ev.finished,
                        ev.finish_reason,
                        ev.num_prompt_tokens,
                        completion,
                        ev.num_cached_tokens,
                    )
        finally:
            if not finished:
                self.closed_early.add(request.request_id)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def backend(loaded) -> Iterator[EngineBackend]:
    b = EngineBackend(loaded)
    yield b
    b.engine.shutdown()


@pytest.fixture(scope="module")
def base_url(backend) -> Iterator[str]:
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(backend), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(make_llm):
    """The same engine, driven synchronously in process: what the API must reproduce at temperature 0."""
    return make_llm(num_kv_blocks=256)


def _post(base_url: str, path: str, content: bytes | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", content=content, timeout=60, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    return error


def _assert_still_serving(client: openai.OpenAI, backend: EngineBackend) -> None:
    out = client.chat.completions.create(model=backend.model_name, messages=HELLO, max_tokens=4, temperature=0)
    assert out.choices[0].message.content and out.usage.completion_tokens >= 1


# ---- happy paths ------------------------------------------------------------------------------------------
def test_health_and_models(base_url, client, backend):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [backend.model_name]
    assert models[0].model_extra["max_model_len"] == backend.max_context
    assert client.models.retrieve(backend.model_name).id == backend.model_name


def test_chat_equals_in_process_engine(client, backend, reference):
    expected = reference.chat(HELLO, GREEDY)[0]
    raw = client.chat.completions.with_raw_response.create(
        model=backend.model_name, messages=HELLO, max_tokens=12, temperature=0
    )
    out = raw.parse()
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == backend.model_name
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details.cached_tokens >= 0
    minted = raw.headers["x-stageserve-interaction-id"]
    assert len(minted) == 32 and int(minted, 16) >= 0


def test_chat_stream_concatenates_to_the_same_text(client, backend, reference):
    expected = reference.chat(HELLO, GREEDY)[0].outputs[0]
    chunks = list(
        client.chat.completions.create(
            model=backend.model_name,
            messages=HELLO,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_completions_and_their_sse_framing(base_url, client, backend, reference):
    prompt = "The capital of France is"
    expected = reference.generate(prompt, GREEDY)[0].outputs[0]
    out = client.completions.create(model=backend.model_name, prompt=prompt, max_tokens=12, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.token_ids)

    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_tenant_identity_reaches_the_backend(base_url, client, backend):
    client.chat.completions.create(model=backend.model_name, messages=HELLO, max_tokens=2, user="alice")
    tenant = backend.requests[-1].tenant
    assert (tenant.user, tenant.app, tenant.call_index) == ("alice", "default", 0) and len(tenant.interaction_id) == 32

    headers = {
        "x-stageserve-user": "bob",
        "x-stageserve-app": "crm",
        "x-stageserve-interaction-id": "conv-7",
        "x-stageserve-call-index": "3",
    }
    r = _post(base_url, "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, "user": "x"}, headers=headers)
    assert r.status_code == 200 and r.headers["x-stageserve-interaction-id"] == "conv-7"
    tenant = backend.requests[-1].tenant
    assert (tenant.user, tenant.app, tenant.interaction_id, tenant.call_index) == ("bob", "crm", "conv-7", 3)
    assert backend.requests[-1].params.temperature == 1.0  # the OpenAI default


# ---- bad input ----------------------------------------------------------------------------------------------
def _chat_error(client: openai.OpenAI, backend: EngineBackend, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    kwargs = {"model": backend.model_name, "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    return info.value.status_code, info.value.response.json()["error"]


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"messages": []}, "messages", "at least one message"),
        ({"max_tokens": -1}, "max_tokens", ">= 1"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
        ({"temperature": 150}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p"),
        ({"n": 2}, "n", "n=1"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}]}, "messages", "maximum context length"),
        ({"max_tokens": 100_000}, "max_tokens", "maximum context length"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "messages.0.content",
            "images are not supported by this deployment yet",
        ),
    ],
    ids=lambda v: None if isinstance(v, dict) else str(v)[:20],
)
def test_bad_chat_requests_are_400(client, backend, kwargs, param, needle):
    status, error = _chat_error(client, backend, **kwargs)
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]


def test_unknown_model_is_404_and_content_parts_are_joined(client, backend):
    status, error = _chat_error(client, backend, model="gpt-4o")
    assert status == 404 and error["type"] == "model_not_found" and "gpt-4o" in error["message"]
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    out = client.chat.completions.create(
        model=backend.model_name, messages=[{"role": "user", "content": parts}], max_tokens=2
    )
    assert out.choices[0].message.content is not None
    assert backend.requests[-1].prompt_token_ids == backend.tokenize_chat(
        [{"role": "user", "content": "What is the capital\nof France?"}]
    )


@pytest.mark.parametrize(
    ("content", "param", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}', None, "malformed JSON"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None, "not valid UTF-8"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "request body"),
        (b'{"max_tokens": 4}', "messages", "messages"),
        (b'{"messages": "hi"}', "messages", "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "4"}', "max_tokens", "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream", "stream"),
    ],
    ids=["truncated-json", "latin1", "empty", "not-object", "no-messages", "str-messages", "str-int", "str-bool"],
)
def test_malformed_bodies_are_400(base_url, content, param, needle):
    response = _post(base_url, "/v1/chat/completions", content, headers={"content-type": "application/json"})
    error = _assert_openai_error(response, 400, param)
    assert needle in error["message"]


def test_bad_headers_and_routes(base_url):
    body = {"messages": HELLO, "max_tokens": 2}
    r = _post(base_url, "/v1/chat/completions", json=body, headers={"x-stageserve-call-index": "first"})
    _assert_openai_error(r, 400, "x-stageserve-call-index")
    _assert_openai_error(_post(base_url, "/v1/completions", json={"prompt": "", "max_tokens": 2}), 400, "prompt")
    _assert_openai_error(_post(base_url, "/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
    _assert_openai_error(httpx.get(f"{base_url}/v1/chat/completions"), 405)
    _assert_openai_error(httpx.get(f"{base_url}/v1/nope"), 404)
    _assert_openai_error(httpx.get(f"{base_url}/v1/models/gpt-4o"), 404, "model")


def test_backend_errors_map_to_http(base_url, client, backend):
    body = {"messages": HELLO, "max_tokens": 2}
    for stream in (False, True):
        backend.fail_next = Overloaded("throttled: app over its share", retry_after_s=1.2)
        r = _post(base_url, "/v1/chat/completions", json={**body, "stream": stream})
        error = _assert_openai_error(r, 429)
        assert error["type"] == "rate_limit_error" and r.headers["retry-after"] == "2"
    backend.fail_next = RuntimeError("boom")
    error = _assert_openai_error(_post(base_url, "/v1/completions", json={"prompt": "Hi"}), 500)
    assert error["message"] == "RuntimeError: boom"
    _assert_still_serving(client, backend)


def test_good_request_after_bad_ones(client, backend):
    _chat_error(client, backend, max_tokens=-5)
    _chat_error(client, backend, model="nope")
    _assert_still_serving(client, backend)


# ---- disconnects ----------------------------------------------------------------------------------------------
def _wait_idle(backend: EngineBackend, request_id: str) -> None:
    deadline = time.monotonic() + 15
    while backend.engine.engine.has_unfinished_requests() or request_id not in backend.closed_early:
        assert time.monotonic() < deadline, "the request was not aborted after the client went away"
        time.sleep(0.02)


# max_tokens is large here on purpose: the request must still be running when the client leaves.
LONG = {"messages": HELLO, "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def test_disconnect_mid_stream_aborts_the_request(base_url, client, backend):
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines).removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
            assert next(lines) == ""
            assert backend.engine.engine.has_unfinished_requests()
    started = time.monotonic()
    _wait_idle(backend, backend.requests[-1].request_id)
    assert time.monotonic() - started < 15
    _assert_still_serving(client, backend)


def test_disconnect_while_waiting_for_a_full_response_aborts_it(base_url, client, backend):
    with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{base_url}/v1/chat/completions", json=LONG)
    _wait_idle(backend, backend.requests[-1].request_id)
    _assert_still_serving(client, backend)
