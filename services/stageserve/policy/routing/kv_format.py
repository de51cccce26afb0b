"""KV format negotiation for one prefill -> decode transfer.

Rule: use the configured format when both sides support it. On ``auto``, prefer the fewest-bytes format
within the accuracy budget (``ACCURATE_COMPACT``: +1.5 % perplexity on the default model, see
docs/benchmarks.md "KV format frontier") that both sides support when the link is slower than
``fast_link_gbps`` (transfer time then dominates), and bf16 on fast links (no quantization work, no accuracy
cost). The lossier 2-bit formats (``hack2``: right for large models and slow links) are used only when
configured. Unit: one request.
"""

from __future__ import annotations

from collections.abc import Collection

ACCURATE_COMPACT = "hack4"  # fewest bytes within +1.5 % perplexity on SmolLM2-135M
COMPACT_FIRST = (ACCURATE_COMPACT, "fp8", "bf16")
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
