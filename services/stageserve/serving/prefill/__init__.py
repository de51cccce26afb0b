"""The prefill stage service."""
