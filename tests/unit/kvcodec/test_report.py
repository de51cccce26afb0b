"""kv_report / format_report against papers.md §1.8 (pure, no torch)."""

from __future__ import annotations

from typing import Any

import pytest

from stageserve.kvcodec.format import FORMATS
from stageserve.kvcodec.report import DEFAULT_PROMPT_LENGTHS, format_report, kv_report

SMOL = (30, 3, 64)  # layers, KV heads, head_dim


def _by_tokens(rows: list[dict[str, Any]]) -> dict[int | None, dict[str, Any]]:
    return {r["tokens"]: r for r in rows}


def test_smollm2_hack2_steady_and_2k() -> None:
    rows = kv_report("hack2", *SMOL)
    assert [r["tokens"] for r in rows] == [None, *DEFAULT_PROMPT_LENGTHS]
    steady = rows[0]
    assert steady["case"] == "steady"
    assert steady["wire_bytes_per_token"] == steady["cache_bytes_per_token"] == 3780
    assert steady["bf16_bytes_per_token"] == 23_040
    assert round(100 * steady["cache_ratio"], 1) == 16.4
    r2k = _by_tokens(rows)[2048]
    assert r2k["cache_bytes"] == 8_974_080
    assert r2k["bf16_bytes"] == 47_185_920
    assert round(100 * r2k["cache_ratio"], 1) == 19.0
    assert r2k["cache_bytes_per_token"] == 8_974_080 / 2048
    assert round(100 * _by_tokens(rows)[512]["cache_ratio"], 1) == 26.9
    # the compact 4-bit tail makes the wire cheaper than the decode cache
    assert r2k["wire_bytes"] < r2k["cache_bytes"]


def test_smollm2_padded_variant() -> None:
    steady = kv_report("hack2", *SMOL, pad_pages=True)[0]
    assert steady["cache_bytes_per_token"] == 3840
    assert round(100 * steady["cache_ratio"], 1) == 16.7


def test_hack2_ratios_monotone_in_prompt_length() -> None:
    rows = kv_report("hack2", *SMOL, prompt_lengths=(256, 512, 1024, 2048, 4096, 8192, 32768, 131072))[1:]
    for key in ("cache_ratio", "wire_ratio"):
        ratios = [r[key] for r in rows]
        assert ratios == sorted(ratios, reverse=True), key
        assert ratios[-1] > kv_report("hack2", *SMOL)[0][key]  # approaches the steady state from above


def test_k4v2_between_hack2_and_hack4() -> None:
    reps = {f: kv_report(f, 32, 8, 128) for f in ("hack2", "hack-k4v2", "hack4")}
    for i in range(len(reps["hack2"])):
        for key in ("wire_bytes_per_token", "cache_bytes_per_token"):
            lo, mid, hi = (reps[f][i][key] for f in ("hack2", "hack-k4v2", "hack4"))
            assert lo < mid < hi, (i, key)


def test_bf16_is_unity_and_kivi2_equals_hack2() -> None:
    for r in kv_report("bf16", *SMOL):
        assert r["cache_ratio"] == r["wire_ratio"] == 1.0
    assert [r["cache_bytes"] for r in kv_report("kivi2", *SMOL)] == [
        r["cache_bytes"] for r in kv_report("hack2", *SMOL)
    ]


def test_all_formats_render() -> None:
    for f in FORMATS:
        text = format_report(kv_report(f, *SMOL))
        lines = text.splitlines()
        assert len(lines) == 2 + 1 + len(DEFAULT_PROMPT_LENGTHS)
        assert lines[0].split()[0] == "format" and set(lines[1]) <= {"-", " "}
        assert "steady" in lines[2] and lines[2].startswith(f)
    text = format_report(kv_report("hack2", *SMOL, prompt_lengths=(2048,)))
    assert "16.4" in text and "19.0" in text and "3,780.0" in text


def test_report_validation() -> None:
    with pytest.raises(ValueError, match="format"):
        kv_report("int3", *SMOL)
    with pytest.raises(ValueError, match="num_layers"):
        kv_report("hack2", 0, 3, 64)
    with pytest.raises(ValueError, match="prompt_lengths"):
        kv_report("hack2", *SMOL, prompt_lengths=(0,))
    with pytest.raises(ValueError, match="page_size"):
        kv_report("hack2", *SMOL, page_size=48)
