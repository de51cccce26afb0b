"""Continuous batching: the per-step scheduling policy and the sequence state it works on."""
