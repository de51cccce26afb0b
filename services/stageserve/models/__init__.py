"""Model code (the Llama family: SmolLM2, Llama 2/3, Mistral, Qwen2) and weight loading."""

from stageserve.models.config import ModelConfig, ModelLoadError
from stageserve.models.loader import LoadedModel, default_model_path, load_model

__all__ = ["LoadedModel", "ModelConfig", "ModelLoadError", "default_model_path", "load_model"]
