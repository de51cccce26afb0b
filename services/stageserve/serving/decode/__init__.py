"""The decode stage service."""
