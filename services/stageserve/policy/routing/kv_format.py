"""KV format negotiation for one prefill -> decode transfer.

Rule: use the configured format when both sides support it. On ``auto``, prefer the most compact format
both sides support when the link is slower than ``fast_link_gbps`` (transfer time then dominates), and
bf16 on fast links (no quantization work, no accuracy cost). Unit: one request.
"""

from __future__ import annotations

from collections.abc import Collection

COMPACT_FIRST = ("hack2", "hack-k4v2", "hack4", "fp8", "bf16")
FAST_LINK_GBPS = 25.0


def negotiate(
    configured: str,
    prefill: Collection[str],
    decode: Collection[str],
    link_gbps: float,
    fast_link_gbps: float = FAST_LINK_GBPS,
) -> str:
    both = set(prefill) & set(decode)
    if not both:
        raise ValueError("kv_format: prefill and decode share no KV format")
    if configured != "auto":
        if configured not in both:
            raise ValueError(f"kv_format: {configured!r} is not supported by both prefill and decode ({sorted(both)})")
        return configured
    if link_gbps >= fast_link_gbps and "bf16" in both:
        return "bf16"
    return next(f for f in COMPACT_FIRST if f in both)
