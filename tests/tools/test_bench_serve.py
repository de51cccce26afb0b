"""``stageserve bench serve``: one tiny run on a real pipeline (one start), plus its pure helpers."""

from __future__ import annotations

import argparse
import json

import pytest

from stageserve.tools.bench_serve import (
    DEFAULTS,
    PERCENTILES,
    add_bench_serve_parser,
    computed_kv_bytes,
    format_report,
    parse_timestamp,
    percentile,
    run_bench_serve,
    summarize,
    summarize_layerwise,
)
from tests.conftest import DATA

TRACE = DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
WIKITEXT = DATA / "wikitext2" / "test.txt"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_serve_parser(parser.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(["serve", *argv])


def test_parser_defaults_match_the_brief():
    args = _parse([])
    assert (args.num_requests, args.time_scale, args.scale, args.max_output) == (24, 0.05, 0.25, 32)
    assert args.formats == "bf16,fp8" and args.link_gbps == 1.0 and args.gateway is None and args.json is None
    assert args.data.endswith("AzureLLMInferenceTrace_conv.csv") and args.corpus.endswith("test.txt")
    assert not args.skip_layerwise_compare and callable(args.func)
    assert set(DEFAULTS) <= set(vars(args))


def test_timestamp_and_percentiles():
    a, b = parse_timestamp("2023-11-16 18:17:03.9799600"), parse_timestamp("2023-11-16 18:17:04.0799600")
    assert b - a == pytest.approx(0.1, abs=1e-6)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None
    s = summarize([0.3, 0.1, 0.2, 5.0])
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"] == 5.0 and s["n"] == 4


def test_fp8_wire_bytes_are_about_half_of_bf16():
    kv = computed_kv_bytes(["bf16", "fp8"], [10, 100, 1000], num_layers=30, num_kv_heads=3, head_dim=64)
    assert kv["bf16"]["1024"]["bytes_per_token"] == 30 * 3 * 64 * 2 * 2  # K and V, bf16
    for n in ("1024", "2048", "8192"):
        assert 0.50 <= kv["fp8"][n]["ratio_to_bf16"] <= 0.55
        assert kv["bf16"][n]["ratio_to_bf16"] == 1.0


def test_layerwise_summary_compares_modes():
    def call(prefill_s, exposed, jct):
        return {"prompt_tokens": 1024, "kv_bytes": 100, "prefill_s": prefill_s, "exposed_transfer_s": exposed,
                "ttft_s": prefill_s + exposed, "jct_s": jct}  # fmt: skip

    out = summarize_layerwise(
        {
            "layerwise": [call(1.0, 0.01, 2.0), call(1.2, 0.03, 2.2)],
            "after_prefill": [call(1.0, 0.20, 2.2), call(1.2, 0.22, 2.4)],
        }
    )
    assert out["layerwise"]["exposed_transfer_s_mean"] == pytest.approx(0.02)
    assert out["after_prefill"]["exposed_transfer_s_mean"] == pytest.approx(0.21)
    assert out["exposed_saved_s"] == pytest.approx(0.19)
    assert out["exposed_ratio"] == pytest.approx(0.02 / 0.21)
    assert "exposed_saved_s" not in summarize_layerwise({"layerwise": [call(1.0, 0.01, 2.0)]})


@pytest.mark.model
@pytest.mark.timeout(300)
def test_bench_serve_tiny_run(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    args = _parse(
        [
            "--data", str(TRACE), "--corpus", str(WIKITEXT),
            "--num-requests", "4", "--max-output", "4", "--scale", "0.05", "--time-scale", "0.002",
            "--layerwise-tokens", "256", "--skip-layerwise-compare", "--timeout", "240",
            "--log-dir", str(tmp_path / "logs"), "--json", str(out_json), "--quiet",
        ]
    )  # fmt: skip
    result = run_bench_serve(args)
    printed = capsys.readouterr().out

    # 1. serving: every request completed with its trace length, percentiles ordered
    assert set(result["serve"]) == {"bf16", "fp8"}
    for fmt, s in result["serve"].items():
        assert s["requests"] == s["completed"] == 4 and s["failed"] == 0 and not s["errors"], (fmt, s["errors"])
        assert s["output_tokens"] == s["expected_output_tokens"] == sum(result["workload"]["output_tokens"])
        for metric in ("ttft_s", "itl_s", "e2e_s"):
            values = [s[metric][f"p{q}"] for q in PERCENTILES]
            assert all(v is not None and v >= 0 for v in values), (fmt, metric)
            assert values[0] <= values[1] <= values[2], (fmt, metric, values)
        assert s["ttft_s"]["p50"] <= s["e2e_s"]["p50"] and s["ttft_s"]["max"] <= s["e2e_s"]["max"]
        assert s["request_throughput_rps"] > 0 and s["output_tok_s"] > 0
        assert s["cached_tokens"] == 0  # prefix caching is off in the bench's own pipeline

    # 2. KV bytes: fp8 about half of bf16 for >= 1K prompts; direct Prefill kv_bytes equal the computed bytes
    computed = result["kv_bytes"]["computed"]
    for n in ("1024", "2048", "8192"):
        assert 0.50 <= computed["fp8"][n]["ratio_to_bf16"] <= 0.55
    measured = result["kv_bytes"]["measured"]
    assert len(measured) == 3 * 2 and {m["format"] for m in measured} == {"bf16", "fp8"}
    for m in measured:
        assert m["kv_bytes"] == m["computed_bytes"] > 0 and m["equal"], m
        assert m["kv_frames"] == m["expected_frames"] and m["returned_format"] == m["format"]
        assert m["finished"] and m["output_tokens"] == 2

    # 3. layer-wise mode measured on the one pipeline; the second pipeline skipped
    lw = result["layerwise"]
    assert lw["skipped"] and set(lw["modes"]) == {"layerwise"}
    mode = lw["modes"]["layerwise"]
    assert mode["calls"] == 3 and mode["prefill_s_mean"] > 0 and mode["exposed_transfer_s_mean"] >= 0
    assert mode["jct_s_mean"] >= mode["prefill_s_mean"]
    assert set(lw["jct_by_format"]) == {"bf16", "fp8"}
    assert lw["jct_by_format"]["fp8"]["kv_bytes_mean"] < lw["jct_by_format"]["bf16"]["kv_bytes_mean"]

    assert json.loads(out_json.read_text())["serve"]["bf16"]["completed"] == 4
    assert "TTFT p50" in printed and "measured with direct Prefill calls" in printed
    assert format_report(result).splitlines()[0].startswith("stageserve bench serve")
