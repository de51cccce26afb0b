"""The multimodal settings every stage derives from one config (gateway estimate == encoder output)."""

from __future__ import annotations

from typing import Any

from stageserve.models.multimodal import ImageLimits, MultimodalConfig, multimodal_config
from stageserve.models.vision import VisionConfig
from stageserve.serving.common.config import StageServeConfig


def stage_multimodal_config(config: StageServeConfig, tokenizer: Any) -> MultimodalConfig:
    e = config.encoder
    vision = VisionConfig(
        image_size=e.vision_image_size,
        patch_size=e.vision_patch_size,
        hidden_size=e.vision_hidden_size,
        num_layers=e.vision_layers,
        num_heads=e.vision_heads,
        intermediate_size=4 * e.vision_hidden_size,
    )
    limits = ImageLimits(e.max_image_bytes, e.max_image_side, e.max_images_per_request)
    return multimodal_config(config.model, tokenizer, e.vision_seed, e.max_grid, limits, vision)
