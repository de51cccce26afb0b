"""KV byte report per format: steady-state and per-prompt bytes per token vs BF16 (pure, stdlib only).

Rows (one per case) are plain dicts:

* ``case``: ``"steady"`` or ``"prompt"``; ``tokens``: prompt length (``None`` for steady).
* ``wire_bytes`` / ``cache_bytes`` / ``bf16_bytes``: totals over all layers (``None`` for steady).
  ``wire`` sends the open block as the compact tail; ``cache`` is the decode cache (open block BF16).
* ``wire_bytes_per_token`` / ``cache_bytes_per_token`` / ``bf16_bytes_per_token``: totals / tokens
  (steady: closed pages only, so wire = cache).
* ``wire_ratio`` / ``cache_ratio``: against BF16.

Page padding: the report uses ``PageFormat``'s default (no 4Π padding of layer pages), which reproduces
papers.md's headline figures (SmolLM2 hack2: 3,780 B/token = 16.4%; the padded variant, 3,840 B = 16.7%, is
available with ``pad_pages=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from stageserve.kvcodec.format import PageFormat

__all__ = ["kv_report", "format_report"]

DEFAULT_PROMPT_LENGTHS: tuple[int, ...] = (512, 1024, 2048, 8192, 32768)


def kv_report(
    fmt_name: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int = 64,
    prompt_lengths: Iterable[int] = DEFAULT_PROMPT_LENGTHS,
    pad_pages: bool = False,
) -> list[dict[str, Any]]:
    """Steady-state row followed by one row per prompt length (see the module docstring for keys)."""
    fmt = PageFormat(fmt_name, num_kv_heads, head_dim, page_size=page_size, pad_pages=pad_pages)
    if num_layers < 1:
        raise ValueError(f"num_layers: must be >= 1, got {num_layers}")
    bf16_tok = fmt.bf16_bytes_per_token * num_layers
    steady = fmt.bytes_per_token_steady * num_layers
    base = {
        "format": fmt_name,
        "layers": num_layers,
        "kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "page_size": page_size,
    }
    rows: list[dict[str, Any]] = [
        {
            **base,
            "case": "steady",
            "tokens": None,
            "wire_bytes": None,
            "cache_bytes": None,
            "bf16_bytes": None,
            "wire_bytes_per_token": steady,
            "cache_bytes_per_token": steady,
            "bf16_bytes_per_token": float(bf16_tok),
            "wire_ratio": steady / bf16_tok,
            "cache_ratio": steady / bf16_tok,
        }
    ]
    for t in prompt_lengths:
        if t < 1:
            raise ValueError(f"prompt_lengths: must be >= 1, got {t}")
        wire = fmt.request_bytes(t, num_layers, wire=True)
        cache = fmt.request_bytes(t, num_layers, wire=False)
        bf16 = fmt.bf16_request_bytes(t, num_layers)
        rows.append(
            {
                **base,
                "case": "prompt",
                "tokens": t,
                "wire_bytes": wire,
                "cache_bytes": cache,
                "bf16_bytes": bf16,
                "wire_bytes_per_token": wire / t,
                "cache_bytes_per_token": cache / t,
                "bf16_bytes_per_token": bf16 / t,
                "wire_ratio": wire / bf16,
                "cache_ratio": cache / bf16,
            }
        )
    return rows


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of ``kv_report`` rows (one line per row)."""
    header = ("format", "tokens", "wire B/tok", "wire %", "cache B/tok", "cache %", "bf16 B/tok")
    lines = [header]
    for r in rows:
        tokens = "steady" if r["tokens"] is None else str(r["tokens"])
        lines.append(
            (
                str(r["format"]),
                tokens,
                f"{r['wire_bytes_per_token']:,.1f}",
                f"{100 * r['wire_ratio']:.1f}",
                f"{r['cache_bytes_per_token']:,.1f}",
                f"{100 * r['cache_ratio']:.1f}",
                f"{r['bf16_bytes_per_token']:,.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
