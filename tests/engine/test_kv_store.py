"""kv_store="codes": closed pages live as packed codes in a PagedCodeStore and decode steps attend on them."""

from __future__ import annotations

import pytest
import torch

from stageserve.engine import SamplingParams
from stageserve.engine.attention import SeqChunk, TorchAttentionStep
from stageserve.engine.kv_cache import PagedKVCache
from stageserve.engine.kv_quant import CodePool, PageCloser, SeqCodes
from stageserve.kvcodec import wire
from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.paged import FIELDS, PagedCodeStore
from stageserve.kvcodec.reference import decode_attention
from tests.conftest import PROMPTS


@pytest.mark.parametrize("name", ["hack2", "kivi2"])
def test_decode_step_on_codes_matches_reference(name):
    """One decode step through TorchAttentionStep equals reference.decode_attention on the stored pages."""
    torch.manual_seed(0)
    h, d, hq, bs = 2, 64, 6, 16
    fmt = PageFormat(name, h, d, page_size=64)
    cache = PagedKVCache(1, 16, bs, h, d, torch.float32, storage_dtype=torch.bfloat16)
    pool = CodePool(fmt, 1, 8)
    table, ctx = list(range(10)), fmt.num_sinks + 2 * 64 + 10  # sinks, 2 pages, 9 open rows + the new one
    cache.write(0, cache.slots_for(table, 0, ctx - 1), torch.randn(ctx - 1, h, d), torch.randn(ctx - 1, h, d))
    codes = SeqCodes(64)
    assert PageCloser(cache, pool).close_ready(fmt, table, ctx - 1, 0, codes) == fmt.num_sinks + 128
    assert codes.starts == [fmt.num_sinks, fmt.num_sinks + 64] and pool.num_free == 6
    q, k, v = torch.randn(1, hq, d), torch.randn(1, h, d), torch.randn(1, h, d)
    step = TorchAttentionStep(cache, [SeqChunk(0, 1, ctx - 1, table, codes=codes)], None, pool)
    assert step.code_decodes is not None
    got = step.run(0, q, k, v)
    rows_k, rows_v = cache.k[0][cache.slots_for(table, 0, ctx)], cache.v[0][cache.slots_for(table, 0, ctx)]
    pages = [pool.store.read_page(0, p) for p in codes.page_ids]
    want = torch.empty_like(got)
    g = hq // h
    for kv in range(h):
        want[0, kv * g : (kv + 1) * g] = decode_attention(
            q[0, kv * g : (kv + 1) * g],
            rows_k[: fmt.num_sinks, kv],
            rows_v[: fmt.num_sinks, kv],
            [p[kv] for p in pages],
            rows_k[fmt.num_sinks + 128 :, kv],
            rows_v[fmt.num_sinks + 128 :, kv],
            int8=fmt.computes_on_codes,
        )
    diff = (got - want).abs()
    assert diff.max() < 1e-2, diff.max()
    assert (diff < 1e-4).float().mean() >= 0.9


def test_decode_engine_installs_wire_pages_unchanged(make_llm):
    """Pages pushed as wire bytes land in the decode engine's code store exactly as write_pages would store
    them (nothing re-quantized); decode then runs on them and frees them at the end."""
    prefill = make_llm(num_kv_blocks=64, role="prefill")
    decode = make_llm(num_kv_blocks=64, role="decode", kv_format="hack2", kv_store="codes")
    pool = decode.engine.code_pool
    assert pool is not None
    ids = (prefill.encode(PROMPTS[4]) * 4)[:150]
    rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    sink = lambda layer, start, k, v: rows.setdefault(layer, []).append((start, k.clone(), v.clone()))  # noqa: E731
    prefill.engine.add_request("p", ids, SamplingParams(max_tokens=1, temperature=0.0), kv_sink=sink)
    first = None
    while prefill.engine.has_unfinished_requests():
        for ev in prefill.engine.step():
            first = ev.token_ids[0] if ev.token_ids else first
    layers = len(rows)
    k_all = [torch.cat([r[1] for r in sorted(rows[i], key=lambda r: r[0])]) for i in range(layers)]
    v_all = [torch.cat([r[2] for r in sorted(rows[i], key=lambda r: r[0])]) for i in range(layers)]
    fmt = decode.engine.page_format("hack2")
    spans = wire.spans(fmt, len(ids))
    eng = decode.engine
    eng.begin_import("d", ids, SamplingParams(max_tokens=6, temperature=0.0), "hack2")
    for layer in range(layers):
        for s in spans:
            payload = wire.pack(fmt, s, k_all[layer][s.start : s.end], v_all[layer][s.start : s.end])
            k, v = wire.unpack(fmt, s, payload)
            eng.import_kv("d", layer, s.start, k, v, payload if s.kind == "page" else None)
    codes = eng._imports["d"].codes
    pages = [s for s in spans if s.kind == "page"]
    assert codes.starts == [s.start for s in pages] and len(pages) == 2
    ref = PagedCodeStore.allocate(fmt, layers, len(pages))
    for layer in range(layers):
        kp = torch.stack([k_all[layer][s.start : s.end] for s in pages])
        vp = torch.stack([v_all[layer][s.start : s.end] for s in pages])
        ref.write_pages(layer, list(range(len(pages))), kp, vp)
    for name in FIELDS:
        assert torch.equal(pool.store.fields[name][:, codes.page_ids], ref.fields[name]), name
    eng.commit_import("d", first)
    assert eng.requests["d"].codes.page_ids  # installed pages kept: decode steps attend on them
    out = []
    while eng.has_unfinished_requests():
        for ev in eng.step():
            out += ev.token_ids
    assert len(out) == 6
    assert pool.num_free == pool.store.num_pages  # freed when the request finished
