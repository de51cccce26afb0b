"""Images end to end: gateway -> 2 encoder replicas -> prefill (pulls embeddings) -> decode, against the
in-process multimodal model run the same disaggregated way (prefill role -> wire -> decode role)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re

import httpx
import pytest
import torch
from PIL import Image

from stageserve.client import Client, InvalidRequest
from stageserve.engine import LLM, SamplingParams
from stageserve.engine.model_runner import ImageEmbeds
from stageserve.engine.multimodal import MultimodalLLM
from stageserve.kvcodec import wire
from stageserve.kvcodec.format import PageFormat
from stageserve.models.multimodal import embedding_key
from stageserve.serving.common.multimodal import stage_multimodal_config

MAX_TOKENS = 6


def png(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def mm_pipeline():
    from stageserve.serving.supervisor import Supervisor, free_port_config

    config = free_port_config(
        encoder={"replicas": 2},
        prefill={"kv_cache_memory_bytes": 128 << 20},
        decode={"kv_cache_memory_bytes": 128 << 20},
    )
    supervisor = Supervisor(config, startup_timeout_s=600.0)  # a loaded CI box can take minutes to start 6
    endpoints = supervisor.start()
    try:
        yield config, endpoints
    finally:
        supervisor.stop()


@pytest.fixture(scope="module")
def reference(loaded, mm_pipeline):
    config, _ = mm_pipeline
    prefill = LLM(loaded=loaded, role="prefill", num_kv_blocks=128)
    mm = stage_multimodal_config(config, loaded.tokenizer)
    return MultimodalLLM.from_engine(prefill.engine, mm), LLM(loaded=loaded, role="decode", num_kv_blocks=128)


def _in_process(reference, messages, fmt_name: str) -> list[int]:
    model, decode = reference
    ids, starts, images = model.prompt(messages)
    spans = [ImageEmbeds(s, e, embedding_key(e)) for s, e in zip(starts, model.encode(images), strict=True)]
    mc = model.engine.model_config
    fmt = PageFormat(fmt_name, mc.num_key_value_heads, mc.head_dim)
    framer = wire.LayerFramer(fmt, mc.num_hidden_layers, len(ids))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    decode.engine.begin_import("r", ids, params, fmt_name)

    def sink(layer, start, k, v):
        for span, payload in framer.add(layer, start, k, v):
            k2, v2 = wire.unpack(fmt, span, payload)
            decode.engine.import_kv("r", layer, span.start, k2, v2)

    model.engine.add_request("r", ids, params, kv_sink=sink, images=spans)
    first = []
    while model.engine.has_unfinished_requests():
        first += [t for e in model.engine.step() for t in e.token_ids]
    decode.engine.commit_import("r", first[0])
    out: list[int] = []
    while decode.engine.has_unfinished_requests():
        out += [t for e in decode.engine.step() for t in e.token_ids]
    return out


def _encoded_tokens(endpoints) -> list[float]:
    counts = []
    for url in endpoints.metrics["encoder"]:
        text = httpx.get(url, timeout=5).text
        match = re.search(r"^stageserve_encoder_image_tokens_total (\S+)$", text, re.M)
        counts.append(float(match.group(1)) if match else 0.0)
    return counts


def _chat(endpoints, messages, fmt: str) -> list[int]:
    with Client(endpoints.gateway_grpc, timeout=240) as client:
        out = client.chat(messages, max_tokens=MAX_TOKENS, ignore_eos=True, kv_format=fmt)
    return list(out.token_ids)


@pytest.mark.parametrize(("num_images", "fmt"), [(3, "hack2"), (8, "hack2")])  # 1 image: the test below
def test_images_through_pipeline_equal_in_process(mm_pipeline, reference, num_images, fmt):
    _, endpoints = mm_pipeline
    images = [png(24 + 5 * i, 40 - 2 * i, seed=num_images * 10 + i) for i in range(num_images)]
    messages = [{"role": "user", "content": "What is in these pictures?", "images": images}]
    before = _encoded_tokens(endpoints)
    got = _chat(endpoints, messages, fmt)
    assert got == _in_process(reference, messages, fmt)
    after = _encoded_tokens(endpoints)
    assert sum(after) - sum(before) == 64 * num_images  # one 64-token tile each, encoded exactly once
    if num_images > 1:  # the request was split across both encoder replicas
        assert all(a > b for a, b in zip(after, before, strict=True))


def test_openai_image_url_and_different_images_do_not_share_cache(mm_pipeline, reference):
    _, endpoints = mm_pipeline
    outs = []
    for seed in (1, 2, 1):
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png(90, 50, seed))}},
                        {"type": "text", "text": "Describe it."},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        headers = {"x-stageserve-kv-format": "bf16"}
        r = httpx.post(f"{endpoints.openai_base_url}/chat/completions", json=body, headers=headers, timeout=240)
        assert r.status_code == 200, r.text
        outs.append((r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]))
    assert outs[0] == outs[2]  # same image: same answer (second time from the prefix cache)
    assert outs[0][1] == outs[1][1]  # same positions (a 2x1 grid + thumbnail = 192 image tokens) ...
    assert outs[1][0] != outs[0][0]  # ... but another image: no false prefix-cache hit
    expected = _in_process(reference, [{"role": "user", "content": "Describe it.", "images": [png(90, 50, 2)]}], "bf16")
    assert outs[1][0] == reference[0].engine.tokenizer.decode(expected, skip_special_tokens=True)


def _truncated_png() -> bytes:
    data = png(60, 60, 5)
    return data[: len(data) // 2]


BAD_IMAGES = {
    "corrupt": ([b"definitely not an image"], "cannot decode image"),
    "unsupported format": ([png(20, 20, 1, "TIFF")], "unsupported image format TIFF"),
    "too many": ([png(8, 8, i) for i in range(17)], "more than the limit of 16"),
    "oversized": ([png(4100, 2, 3)], "each side must be"),
    "truncated": ([_truncated_png()], "cannot decode image"),
}


def test_bad_images_are_400_and_do_not_affect_a_concurrent_request(mm_pipeline, reference):
    """Each bad image is a 400 / INVALID_ARGUMENT while a good 1-image request runs; that one still equals the
    in-process model's output."""
    _, endpoints = mm_pipeline
    good = [{"role": "user", "content": "And this one?", "images": [png(30, 30, 77)]}]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_chat, endpoints, good, "bf16")
        for name, (images, needle) in BAD_IMAGES.items():
            content = [{"type": "image_url", "image_url": {"url": data_url(d)}} for d in images]
            body = {"messages": [{"role": "user", "content": [*content, {"type": "text", "text": "hi"}]}]}
            r = httpx.post(f"{endpoints.openai_base_url}/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
            assert r.status_code == 400, (name, r.text)
            assert needle in r.json()["error"]["message"], name
            with Client(endpoints.gateway_grpc, timeout=60) as client, pytest.raises(InvalidRequest) as info:
                client.chat([{"role": "user", "content": "hi", "images": images}], max_tokens=2)
            assert needle in str(info.value), name
        assert pending.result(timeout=240) == _in_process(reference, good, "bf16")


def test_remote_image_urls_are_rejected_unless_enabled(mm_pipeline):
    _, endpoints = mm_pipeline
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    r = httpx.post(f"{endpoints.openai_base_url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.0.image_url" and "data: URL" in error["message"]


def test_text_only_requests_skip_the_encoder(mm_pipeline):
    _, endpoints = mm_pipeline
    before = _encoded_tokens(endpoints)
    assert _chat(endpoints, [{"role": "user", "content": "Hello!"}], "bf16")
    assert _encoded_tokens(endpoints) == before
