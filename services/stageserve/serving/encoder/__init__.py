"""The encoder stage service."""
