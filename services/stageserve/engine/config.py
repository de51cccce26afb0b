"""The engine's one frozen configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Role = Literal["both", "prefill", "decode"]
KV_FORMATS = ("auto", "bf16", "fp8", "kivi2", "hack2", "hack4", "hack-k4v2", "hack2r", "hack4r", "hack-k4v2r")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. ``role``: "both" generates end to end; "prefill" runs prompts, hands their KV out
    layer by layer and stops after the first token; "decode" takes KV in and continues generating."""

    model: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 1 << 30  # KV cache size when num_kv_blocks is not given
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    role: Role = "both"
    seed: int = 0
    # KV cache format: "auto" keeps K/V in the model dtype. A page format (bf16, fp8, hack2, hack4, hack-k4v2,
    # kivi2) stores sinks and the open block in BF16 and quantizes each page of 64 tokens once, when it fills.
    # Quantized formats turn prefix caching off (a shared block would belong to pages of different requests).
    kv_format: str = "auto"
    kv_page_size: int = 64  # Π, tokens per quantized page (32, 64 or 128)
    # Where closed pages of a code format (hack*, kivi2) live for decode steps: "codes" = packed codes in a
    # PagedCodeStore, attention computed on them (INT8 q̃/p̃); "dense" = dequantized values in the dense cache.
    kv_store: str = "codes"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, got {self.role!r}")
        if self.kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {', '.join(KV_FORMATS)}, got {self.kv_format!r}")
        if self.kv_store not in ("codes", "dense"):
            raise ValueError(f"kv_store must be codes or dense, got {self.kv_store!r}")
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
