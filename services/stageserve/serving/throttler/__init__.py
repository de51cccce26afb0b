"""The throttler stage service."""
