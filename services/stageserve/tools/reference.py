"""transformers' own model on the same weights: the reference for tests, eval and benchmarks only."""

from __future__ import annotations

import os
from typing import Any

import torch

from stageserve.models.loader import default_model_path


def load_transformers_model(path: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """AutoModelForCausalLM from an HF directory or a .gguf file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = path or default_model_path()
    if os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype, local_files_only=True
        )
    return model.eval()
