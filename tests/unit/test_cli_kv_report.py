"""`stageserve kv-report` prints the steady-state and per-prompt ratios for a known shape (no weights loaded)."""

from __future__ import annotations

from stageserve.cli import main


def test_kv_report_for_llama_shape(capsys):
    assert main(["kv-report", "--shape", "llama-3.1-8b", "--format", "hack2"]) == 0
    out = capsys.readouterr().out
    steady = next(line for line in out.splitlines() if line.startswith("hack2") and "steady" in line)
    assert "21,504.0" in steady and "16.4" in steady  # 672 B per token per layer x 32 layers


def test_kv_report_rejects_unknown_format(capsys):
    assert main(["kv-report", "--shape", "llama-3.1-8b", "--format", "int3"]) == 2
    assert "format" in capsys.readouterr().err
