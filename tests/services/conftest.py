"""A real pipeline (five stages as processes on 127.0.0.1, free ports) shared by the service tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def pipeline_trace_dir(tmp_path_factory):
    """Where the pipeline's processes write their finished spans (STAGESERVE_TRACE_DIR, one JSONL per process)."""
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="session")
def pipeline(pipeline_trace_dir):
    """Starts `stageserve up`'s supervisor on free ports (small KV caches) and yields its Endpoints."""
    from stageserve.serving.supervisor import Supervisor, free_port_config

    config = free_port_config(
        prefill={"kv_cache_memory_bytes": 128 << 20},
        decode={"kv_cache_memory_bytes": 256 << 20},
        # every request is admitted through the FairServe throttler (OIT + WSC); app t429 has a limit of one
        # new interaction per minute per user, enforced only under overload (test_throttler_pipeline.py)
        throttler={"policy": "fairserve", "limits": {"t429": {"user_per_min": 1}}},
    )
    env = {**os.environ, "STAGESERVE_TRACE_DIR": str(pipeline_trace_dir)}
    supervisor = Supervisor(config, startup_timeout_s=300.0, env=env)
    endpoints = supervisor.start()
    try:
        yield endpoints
    finally:
        supervisor.stop()
