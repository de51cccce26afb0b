"""The engine core every stage runs: paged KV cache, continuous batching, prefill and decode roles.

``from stageserve.engine import LLM, SamplingParams`` is the offline API.
"""

from stageserve.core.sampling import SamplingParams
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import KVCacheFullError, LLMEngine
from stageserve.engine.llm import LLM
from stageserve.engine.outputs import CompletionOutput, RequestOutput, TokenEvent

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "KVCacheFullError",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "TokenEvent",
]
