"""Kernel benchmarks (``stageserve bench kernels``); see ``decode_bench``."""
