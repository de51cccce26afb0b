"""The gateway stage service."""
