"""What the prefill and decode shells share: building the engine from config and reporting load."""

from __future__ import annotations

from stageserve.engine import EngineConfig, LLMEngine
from stageserve.engine.async_engine import AsyncEngine
from stageserve.kvcodec.format import PageFormat
from stageserve.serving.common.config import EngineStageConfig, StageServeConfig
from stageserve.serving.common.convert import FORMAT_IDS
from stageserve.serving.kv_formats import WIRE_FORMATS
from stageserve.v1 import common_pb2


def build_engine(cfg: StageServeConfig, stage: EngineStageConfig, role: str) -> AsyncEngine:
    engine = LLMEngine(
        EngineConfig(
            model=cfg.model,
            dtype=stage.dtype,
            block_size=stage.block_size,
            kv_cache_memory_bytes=stage.kv_cache_memory_bytes,
            max_num_seqs=stage.max_num_seqs,
            max_num_batched_tokens=stage.max_num_batched_tokens,
            enable_prefix_caching=stage.enable_prefix_caching,
            role=role,  # type: ignore[arg-type]
        )
    )
    return AsyncEngine(engine)


def page_format(engine: AsyncEngine, name: str) -> PageFormat:
    mc = engine.engine.model_config
    return PageFormat(name, mc.num_key_value_heads, mc.head_dim)


def stage_load(engine: AsyncEngine, stage: str, replica_id: str, address: str) -> common_pb2.StageLoad:
    load = engine.load
    return common_pb2.StageLoad(
        stage=stage,
        replica_id=replica_id,
        address=address,
        num_waiting=load.num_waiting,
        num_running=load.num_running,
        kv_cache_usage=load.kv_cache_usage,
        pending_tokens=load.pending_tokens,
        kv_formats=[FORMAT_IDS[f] for f in WIRE_FORMATS],
        model=engine.engine.model_config.name,
    )
