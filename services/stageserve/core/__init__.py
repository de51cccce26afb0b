"""Stdlib-only types shared by every process and policy (no torch, grpc or kubernetes)."""

from stageserve.core.sampling import SamplingParams

__all__ = ["SamplingParams"]
