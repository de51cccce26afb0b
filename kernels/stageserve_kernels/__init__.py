"""Triton kernels for stageserve (HACK attention on 2-bit codes, baselines) with thin launchers."""
