"""ZeroC: exactness at full rank, truncated shapes, the compressed directory round trip, the engine over it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stageserve.engine.attention import NoCacheAttention
from stageserve.models.loader import load_model
from stageserve.models.zeroc import (
    ZEROC_FILE,
    Bases,
    RankPlan,
    ZeroCModel,
    calibrate,
    kv_values_per_token,
    page_bytes_per_token,
    save_compressed,
)
from stageserve.tools.eval_ppl import corpus_split_tokens, corpus_tokens
from stageserve.tools.sp_prefill import tiny_config

DATA = "../shared/data/wikitext2/test.txt"


def _forward(model, ids):
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention())


def _random_bases(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, d, n = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    orth = lambda: torch.linalg.qr(torch.randn(h, d, d, generator=g))[0]  # noqa: E731
    e = torch.linspace(1, 0.01, d).expand(h, d)
    return Bases([orth() for _ in range(n)], [orth() for _ in range(n)], [e] * n, [e] * n)


@pytest.mark.parametrize("method", ["paper", "whitened"])
def test_full_rank_equals_uncompressed_calibrated_tiny(method):
    """Bases from calibration (both methods): full rank reproduces the model; each truncation step loses more."""
    from stageserve.models.llama import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config()
    model = LlamaForCausalLM(cfg).eval()
    ids = [int(x) for x in torch.randint(0, cfg.vocab_size, (120,), generator=torch.Generator().manual_seed(5))]
    ref = _forward(model, ids)
    bases = calibrate(model, ids[:96], window=48, method=method)
    assert (bases.q is not None) == (method == "whitened")
    zc = ZeroCModel(model, bases)
    zc.apply(RankPlan.uniform(cfg.num_hidden_layers, cfg.head_dim, cfg.head_dim))
    torch.testing.assert_close(_forward(model, ids), ref, rtol=1e-4, atol=1e-4)
    zc.apply(RankPlan.uniform(cfg.num_hidden_layers, 8, 8))
    assert (_forward(model, ids) - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="method"):
        calibrate(model, ids, method="nope")


@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_equals_uncompressed_tiny(bias):
    import dataclasses

    torch.manual_seed(0)
    from stageserve.models.llama import LlamaForCausalLM

    cfg = dataclasses.replace(tiny_config(), attention_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    if bias:
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attn.qkv_proj.bias.normal_()
    ids = list(range(3, 40))
    ref = _forward(model, ids)
    zc = ZeroCModel(model, _random_bases(cfg))
    zc.apply(RankPlan.uniform(cfg.num_hidden_layers, cfg.head_dim, cfg.head_dim))
    assert model.layers[0].self_attn.qk_basis is not None  # really rotated, not skipped
    torch.testing.assert_close(_forward(model, ids), ref, rtol=1e-5, atol=1e-5)
    zc.apply(RankPlan.uniform(cfg.num_hidden_layers, 8, 8))
    assert model.kv_head_dims() == [(8, 8)] * cfg.num_hidden_layers
    assert (_forward(model, ids) - ref).abs().max() > 1e-3  # truncation changes the output
    zc.restore()
    torch.testing.assert_close(_forward(model, ids), ref, rtol=0, atol=0)


def test_plan_validation_and_bytes():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="multiples of 8"):
        RankPlan.uniform(cfg.num_hidden_layers, 12, 16).validate(cfg)
    with pytest.raises(ValueError, match="ranks per kind"):
        RankPlan((16,), (16,)).validate(cfg)
    plan = RankPlan((8, 16), (16, 8))
    assert plan.kv_fraction(16) == 0.75
    assert kv_values_per_token(plan, cfg) == 48 * cfg.num_key_value_heads
    full = page_bytes_per_token(None, cfg, "bf16")
    assert full == 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers
    assert page_bytes_per_token(plan, cfg, "bf16") == 0.75 * full
    assert page_bytes_per_token(plan, cfg, "hack2") < page_bytes_per_token(None, cfg, "hack2")


def test_calibration_and_eval_halves_do_not_overlap(loaded):
    tok = loaded.tokenizer
    calib = corpus_split_tokens(tok, DATA, "calib", 256)
    evals = corpus_split_tokens(tok, DATA, "eval", 256)
    assert calib == corpus_tokens(tok, DATA, 256)
    assert calib != evals
    with open(DATA, encoding="utf-8") as fh:
        text = fh.read()
    head = tok.decode(evals[:40])
    assert text.find(head) >= len(text) // 2  # the eval tokens come from the second half
    with pytest.raises(ValueError, match="split"):
        corpus_split_tokens(tok, DATA, "train", 10)


@pytest.fixture(scope="module")
def compressed_dir(loaded, tmp_path_factory):
    """SmolLM2 calibrated on 256 tokens, mixed per-layer ranks, saved and loaded back."""
    model = copy.deepcopy(loaded.model)
    ids = corpus_split_tokens(loaded.tokenizer, DATA, "calib", 128)
    bases = calibrate(model, ids, window=128)
    n, d = loaded.config.num_hidden_layers, loaded.config.head_dim
    plan = RankPlan(tuple(48 if i % 2 else d for i in range(n)), tuple(56 if i % 3 == 0 else d for i in range(n)))
    zc = ZeroCModel(model, bases)
    zc.apply(RankPlan.uniform(n, d, d))
    probe = corpus_split_tokens(loaded.tokenizer, DATA, "eval", 48)
    full_rank_err = float((_forward(model, probe) - _forward(loaded.model, probe)).abs().max())
    zc.apply(plan)
    out = tmp_path_factory.mktemp("zeroc") / "smol"
    save_compressed(model, loaded.tokenizer, plan, str(out), {"source_model": loaded.path})
    return out, plan, model, full_rank_err


def test_full_rank_equals_uncompressed_smollm2(compressed_dir):
    assert compressed_dir[3] < 2e-4  # fp32, hidden states of magnitude ~50


@pytest.fixture(scope="module")
def reloaded(compressed_dir):
    return load_model(str(compressed_dir[0]))


def test_compressed_dir_loads_and_matches(compressed_dir, reloaded):
    out, plan, model, _ = compressed_dir
    meta = json.loads((out / ZEROC_FILE).read_text())
    assert meta["ranks"] == {"qk": list(plan.qk), "v": list(plan.v)}
    assert reloaded.model.kv_head_dims() == list(zip(plan.qk, plan.v, strict=True))
    ids = list(range(100, 140))
    torch.testing.assert_close(_forward(reloaded.model, ids), _forward(model, ids), rtol=1e-5, atol=1e-5)


def test_engine_serves_compressed_model(compressed_dir, reloaded):
    from stageserve.core.sampling import SamplingParams
    from stageserve.engine import LLM

    plan = compressed_dir[1]
    llm = LLM(loaded=reloaded, num_kv_blocks=64)
    cache = llm.engine.cache
    assert [t.shape[-1] for t in cache.k] == list(plan.qk)
    assert [t.shape[-1] for t in cache.v] == list(plan.v)
    ids = llm.tokenizer.encode("The capital of France is")
    got = llm.generate([ids], SamplingParams(max_tokens=5, temperature=0.0))[0]
    # the paged, cached decode path equals full no-cache forwards of the same compressed model
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(5):
            seq.append(int(reloaded.model.logits(_forward(reloaded.model, seq)[-1:]).argmax()))
    assert list(got.outputs[0].token_ids) == seq[len(ids) :]


def test_quantized_pages_on_compressed_dims(reloaded):
    """hack2 pages close over per-layer K/V dims (decode-step scoring of one window)."""
    from stageserve.engine import LLM

    window = corpus_split_tokens(reloaded.tokenizer, DATA, "eval", 72)
    plain = LLM(loaded=reloaded, num_kv_blocks=8).engine.score_by_decode_steps([window])[0]
    hack = LLM(loaded=reloaded, num_kv_blocks=8, kv_format="hack2").engine.score_by_decode_steps([window])[0]
    assert plain.shape == hack.shape == (71,)
    assert torch.isfinite(hack).all()
    assert not torch.equal(plain[68:], hack[68:])  # page [4, 68) was quantized once it filled
    assert float((plain[:60] - hack[:60]).abs().max()) < 0.1  # before that: BF16 rounding only
