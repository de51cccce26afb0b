"""Offline tools behind `stageserve eval` and `stageserve bench` (accuracy and throughput)."""
