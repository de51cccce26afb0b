"""The whole pipeline as real processes on loopback: gateway -> throttler -> prefill -> (KV frames) -> decode."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest

from stageserve.engine import LLM, SamplingParams
from stageserve.kvcodec import wire
from stageserve.kvcodec.format import PageFormat
from stageserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    kvpage_pb2,
    prefill_pb2_grpc,
)
from tests.conftest import PROMPTS

FORMATS = ("bf16", "fp8", "hack2", "hack-k4v2")


def _disaggregated_in_process(loaded, ids: list[int], params: SamplingParams, fmt_name: str) -> list[int]:
    """Prefill role -> wire pack/unpack -> decode role, in one process: what the pipeline must reproduce."""
    prefill = LLM(loaded=loaded, role="prefill", num_kv_blocks=128)
    decode = LLM(loaded=loaded, role="decode", num_kv_blocks=128)
    mc = loaded.config
    fmt = PageFormat(fmt_name, mc.num_key_value_heads, mc.head_dim)
    framer = wire.LayerFramer(fmt, mc.num_hidden_layers, len(ids))
    decode.engine.begin_import("r", ids, params, fmt_name)

    def sink(layer, start, k, v):
        for span, payload in framer.add(layer, start, k, v):
            k2, v2 = wire.unpack(fmt, span, payload)
            decode.engine.import_kv("r", layer, span.start, k2, v2)

    prefill.engine.add_request("r", ids, params, kv_sink=sink)
    first = []
    while prefill.engine.has_unfinished_requests():
        first += [t for e in prefill.engine.step() for t in e.token_ids]
    decode.engine.commit_import("r", first[0])
    out: list[int] = []
    while decode.engine.has_unfinished_requests():
        out += [t for e in decode.engine.step() for t in e.token_ids]
    return out


def _grpc_generate(address: str, ids: list[int], max_tokens: int, kv_format: str) -> tuple[list[int], str]:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            request = gateway_pb2.GenerateRequest(
                prompt_token_ids=gateway_pb2.TokenIds(ids=ids),
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            )
            tokens, text = [], ""
            async for event in stub.Generate(request, metadata=(("x-stageserve-kv-format", kv_format),)):
                tokens += list(event.token_ids)
                text += event.text
            return tokens, text

    return asyncio.run(run())


@pytest.mark.parametrize("kv_format", FORMATS)
def test_greedy_through_pipeline_equals_in_process(pipeline, loaded, kv_format):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for prompt in (PROMPTS[1], PROMPTS[3], PROMPTS[4]):
        ids = loaded.tokenizer.encode(prompt)
        got, text = _grpc_generate(pipeline.gateway_grpc, ids, params.max_tokens, kv_format)
        assert got == _disaggregated_in_process(loaded, ids, params, kv_format)
        assert text == loaded.tokenizer.decode(got, skip_special_tokens=True)


def test_bf16_pipeline_agrees_with_single_engine(pipeline, loaded, llm):
    """bf16 KV may legitimately flip a near-tie of the fp32 engine; it must agree on the first tokens."""
    ids = loaded.tokenizer.encode(PROMPTS[3])
    got, _ = _grpc_generate(pipeline.gateway_grpc, ids, 8, "bf16")
    ref = llm.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0].token_ids
    assert got[:4] == ref[:4]


def test_openai_client_streaming_and_not(pipeline):
    client = openai.OpenAI(base_url=pipeline.openai_base_url, api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=12, temperature=0
    )
    text = full.choices[0].message.content
    assert "Paris" in text
    chunks = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in chunks:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == text
    assert usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [], "max_tokens": 4}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}], "max_tokens": 4}, "messages"),
    ],
)
def test_bad_http_input_gets_400_and_service_keeps_serving(pipeline, body, field):
    r = httpx.post(f"{pipeline.openai_base_url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    ok = httpx.post(
        f"{pipeline.openai_base_url}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_unknown_model_malformed_json_and_bad_utf8(pipeline):
    url = f"{pipeline.openai_base_url}/chat/completions"
    r = httpx.post(url, json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    r = httpx.post(url, content=b'{"messages": "\xff\xfe"}', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400


def test_grpc_bad_input_is_invalid_argument(pipeline):
    async def run():
        async with grpc.aio.insecure_channel(pipeline.gateway_grpc) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            bad = gateway_pb2.GenerateRequest(
                prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=4, temperature=-1)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(bad):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "temperature" in err.value.details()
            empty = gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=4))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(empty):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def _loads(address: str, stub=decode_pb2_grpc.DecodeStub) -> common_pb2.StageLoad:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            return await stub(channel).GetLoad(common_pb2.LoadRequest(), timeout=5)

    return asyncio.run(run())


def test_client_disconnect_frees_kv_on_prefill_and_decode(pipeline):
    body = {"prompt": PROMPTS[4], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{pipeline.openai_base_url}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        decode = pipeline.stages["decode"][0]
        assert _loads(decode).num_running == 1
    deadline = time.monotonic() + 20
    stages = [
        (pipeline.stages["decode"][0], decode_pb2_grpc.DecodeStub),
        (pipeline.stages["prefill"][0], prefill_pb2_grpc.PrefillStub),
    ]
    while time.monotonic() < deadline:
        loads = [_loads(a, stub) for a, stub in stages]
        if all(x.num_running == 0 and x.num_waiting == 0 and x.kv_cache_usage == 0 for x in loads):
            break
        time.sleep(0.2)
    assert all(x.num_running == 0 and x.kv_cache_usage == 0 for x in loads), loads


def test_corrupted_page_is_detected_and_resent(pipeline, loaded):
    """Push a request's KV frames straight to the decode replica with one payload damaged: decode asks for
    that page again, takes the good copy, and generates the same tokens as an undamaged transfer."""
    mc = loaded.config
    fmt = PageFormat("bf16", mc.num_key_value_heads, mc.head_dim)
    ids = loaded.tokenizer.encode(PROMPTS[3])
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prefill = LLM(loaded=loaded, role="prefill", num_kv_blocks=64)
    framer = wire.LayerFramer(fmt, mc.num_hidden_layers, len(ids))
    frames: list[kvpage_pb2.KVFrame] = []

    def sink(layer, start, k, v):
        for span, payload in framer.add(layer, start, k, v):
            page = kvpage_pb2.KVPageFrame(
                layer=layer,
                page_index=span.index,
                token_start=span.start,
                num_tokens=span.length,
                format=common_pb2.KV_FORMAT_BF16,
                crc32=wire.checksum(payload),
                payload=payload,
            )
            frames.append(kvpage_pb2.KVFrame(request_id="corrupt-1", page=page))

    prefill.engine.add_request("corrupt-1", ids, params, kv_sink=sink)
    first = []
    while prefill.engine.has_unfinished_requests():
        first += [t for e in prefill.engine.step() for t in e.token_ids]
    good = frames[5]
    damaged = kvpage_pb2.KVFrame()
    damaged.CopyFrom(good)
    damaged.page.payload = bytes([good.page.payload[0] ^ 0xFF]) + good.page.payload[1:]
    commit = kvpage_pb2.KVFrame(request_id="corrupt-1", commit=kvpage_pb2.KVCommit(first_token_id=first[0]))

    async def run():
        async with grpc.aio.insecure_channel(pipeline.stages["decode"][0]) as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            call = stub.Generate(
                decode_pb2.DecodeRequest(
                    request_id="corrupt-1",
                    prompt_token_ids=ids,
                    kv_format=common_pb2.KV_FORMAT_BF16,
                    sampling=common_pb2.SamplingParams(max_tokens=6, ignore_eos=True),
                )
            )

            async def push(items):
                for item in items:
                    yield item

            first_try = await stub.PushKV(push([*frames[:5], damaged, *frames[6:], commit]))
            assert not first_try.committed
            assert [(r.layer, r.page_index) for r in first_try.resend] == [(good.page.layer, good.page.page_index)]
            second = await stub.PushKV(push([good, commit]))
            assert second.committed
            return [t async for e in call for t in e.token_ids]

    got = asyncio.run(run())
    assert got == _disaggregated_in_process(loaded, ids, params, "bf16")
