"""Routing policies: which replica serves a call, which KV format it uses (pure)."""
