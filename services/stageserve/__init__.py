"""stageserve: LLM and multimodal LLM serving split into stages (gateway, throttler, encoder, prefill, decode)."""

__version__ = "0.1.0"
