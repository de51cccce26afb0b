"""In-process multimodal model (LLaVA-style): vision tower + projector in front of an LLM engine.

What the staged pipeline computes (encoder -> prefill -> decode), in one process: the reference that
pipeline outputs are checked against. Messages are dicts with ``role``, ``content`` and optional ``images``
(encoded image files, placed before the message's text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stageserve.core.sampling import SamplingParams
from stageserve.engine.engine import LLMEngine
from stageserve.engine.model_runner import ImageEmbeds
from stageserve.engine.outputs import TokenEvent
from stageserve.models.multimodal import (
    MultimodalConfig,
    build_vision_tower,
    chat_with_images,
    embedding_key,
    encode_images,
    marked_content,
)
from stageserve.models.vision import VisionTower


class MultimodalLLM:
    def __init__(self, engine: LLMEngine, tower: VisionTower, mm: MultimodalConfig) -> None:
        self.engine = engine
        self.tower = tower
        self.mm = mm

    @classmethod
    def from_engine(cls, engine: LLMEngine, mm: MultimodalConfig, model_path: str | None = None) -> MultimodalLLM:
        return cls(engine, build_vision_tower(model_path, mm, engine.model_config), mm)

    def encode(self, images: Sequence[bytes]) -> list[torch.Tensor]:
        return encode_images(self.tower, list(images), self.mm)

    def prompt(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int], list[bytes]]:
        """Token ids (placeholder runs expanded), image start positions and the images in prompt order."""
        images: list[bytes] = []
        plain = []
        for m in messages:
            imgs = list(m.get("images", ()))
            images.extend(imgs)
            plain.append({"role": m["role"], "content": marked_content(len(imgs), str(m.get("content", "")))})
        ids, starts, _ = chat_with_images(self.engine.tokenizer, plain, images, self.mm)
        return ids, starts, images

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams | None = None) -> list[int]:
        """Generated token ids for one conversation (greedy unless ``params`` says otherwise)."""
        ids, starts, images = self.prompt(messages)
        embeds = self.encode(images) if images else []
        spans = [ImageEmbeds(s, e, embedding_key(e)) for s, e in zip(starts, embeds, strict=True)]
        engine = self.engine
        rid = engine.new_request_id()
        engine.add_request(rid, ids, params or SamplingParams(max_tokens=16), images=spans)
        out: list[int] = []
        try:
            while True:
                for event in engine.step():
                    if event.request_id == rid:
                        out.extend(event.token_ids)
                        if _done(event):
                            return out
        finally:
            engine.abort_request(rid)


def _done(event: TokenEvent) -> bool:
    return event.finished
