"""LLaVA-style multimodal composition: images -> tiles (Pillow) -> vision tower -> image tokens that replace a
placeholder run in the prompt of our Llama-family LM.

Tiling (a small LLaVA-NeXT "anyres"): an image at most one tile in each dimension is one tile (resized to
S x S). A larger one is split into a grid of cols x rows tiles (cols = ceil(w/S), rows = ceil(h/S), each at
most ``max_grid``) after resizing to (cols*S, rows*S), plus one whole-image thumbnail tile first. So the
number of image tokens follows from the image size alone: ``estimate_image_tokens(w, h)`` is known before
encoding and equals what the encoder produces.

Supported weights: (1) the default, a seeded UNTRAINED vision tower + projector attached to the served LM
(SmolLM2 by default; descriptions are meaningless, shapes and numerics are real); (2) an HF LLaVA directory
(``LlavaForConditionalGeneration``: CLIP vision tower, Llama-family LM, ``vision_feature_select_strategy:
default``, a single ``vision_feature_layer``). The image placeholder of the seeded setup is the id of
``<empty_output>`` when the tokenizer has it (SmolLM2: 16), else 0; positions are always sent explicitly,
so the id only matters for what the model sees before the embeddings replace it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stageserve.models.config import ModelConfig, ModelLoadError
from stageserve.models.vision import VisionConfig, VisionTower

IMAGE_MARKER = "<|image|>"  # where an image goes in rendered chat text, replaced by its placeholder run
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
SEEDED_PLACEHOLDER = "<empty_output>"


class ImageError(ValueError):
    """An image is unusable (corrupt, unsupported format, too large); the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 << 20
    max_side: int = 4096  # pixels, either dimension
    max_images: int = 16  # per request


@dataclass(frozen=True)
class MultimodalConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 0
    max_grid: int = 2  # tiles per side for large images
    seed: int = 0
    limits: ImageLimits = field(default_factory=ImageLimits)

    @property
    def tile(self) -> int:
        return self.vision.image_size


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


# ---- sizes and token counts (no decoding) ---------------------------------------------------------------
def tile_grid(width: int, height: int, cfg: MultimodalConfig) -> tuple[int, int]:
    s = cfg.tile
    return min(math.ceil(width / s), cfg.max_grid), min(math.ceil(height / s), cfg.max_grid)


def num_tiles(width: int, height: int, cfg: MultimodalConfig) -> int:
    cols, rows = tile_grid(width, height, cfg)
    return 1 if cols * rows == 1 else cols * rows + 1


def estimate_image_tokens(width: int, height: int, cfg: MultimodalConfig) -> int:
    """Image tokens this image becomes, from its size alone (equals the encoder's output rows)."""
    return num_tiles(width, height, cfg) * cfg.vision.tokens_per_tile


def probe_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Format and size from the header only; raises ImageError for corrupt/unsupported/oversized images."""
    if not data:
        raise ImageError("image is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format or "?", img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc.__class__.__name__}") from None
    if fmt not in ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {fmt}; use one of {', '.join(sorted(ALLOWED_FORMATS))}")
    if w < 1 or h < 1 or max(w, h) > limits.max_side:
        raise ImageError(f"image is {w}x{h} pixels; each side must be 1..{limits.max_side}")
    return ImageInfo(fmt, w, h)


# ---- pixels ---------------------------------------------------------------------------------------------
def preprocess(data: bytes, cfg: MultimodalConfig) -> torch.Tensor:
    """Decodes, resizes, tiles and normalises: -> float32 [num_tiles, 3, S, S]."""
    info = probe_image(data, cfg.limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None
    s = cfg.tile
    cols, rows = tile_grid(info.width, info.height, cfg)
    tiles = [rgb.resize((s, s), Image.Resampling.BICUBIC)]
    if cols * rows > 1:
        big = rgb.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
        tiles += [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    arr = np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])  # [N, S, S, 3]
    mean = np.asarray(cfg.vision.image_mean, dtype=np.float32)
    std = np.asarray(cfg.vision.image_std, dtype=np.float32)
    return torch.from_numpy((arr - mean) / std).permute(0, 3, 1, 2).contiguous()


def encode_images(tower: VisionTower, images: list[bytes], cfg: MultimodalConfig) -> list[torch.Tensor]:
    """Each image's token embeddings [n_i, text_hidden] (one batched forward over all tiles)."""
    pixels = [preprocess(d, cfg) for d in images]
    return split_tiles(tower(torch.cat(pixels)), [p.shape[0] for p in pixels])


def split_tiles(features: torch.Tensor, tiles_per_image: list[int]) -> list[torch.Tensor]:
    out, i = [], 0
    for n in tiles_per_image:
        out.append(features[i : i + n].reshape(-1, features.shape[-1]))
        i += n
    return out


def embedding_key(embeds: torch.Tensor) -> int:
    """A content hash of an image's embeddings (for prefix-cache block keys)."""
    digest = hashlib.blake2b(embeds.detach().contiguous().float().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---- prompts --------------------------------------------------------------------------------------------
def expand_image_markers(
    tokenizer: Any, text: str, token_counts: list[int], image_token_id: int
) -> tuple[list[int], list[int]]:
    """Tokenizes ``text`` (rendered chat with one IMAGE_MARKER per image) with each marker replaced by a run
    of ``token_counts[i]`` placeholders. Returns (ids, start position of each image's run)."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(token_counts):
        raise ValueError(f"{len(pieces) - 1} image markers in the prompt for {len(token_counts)} images")
    ids: list[int] = []
    starts: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
        if i < len(token_counts):
            starts.append(len(ids))
            ids.extend([image_token_id] * token_counts[i])
    return ids, starts


def marked_content(num_images: int, text: str) -> str:
    """A message's content with its images first (LLaVA convention): one marker per image, then the text."""
    return f"{IMAGE_MARKER * num_images}\n{text}" if num_images else text


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The chat template's text (generation prompt added); image parts are IMAGE_MARKERs in the content."""
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def chat_with_images(
    tokenizer: Any, messages: list[dict[str, Any]], images: list[bytes], cfg: MultimodalConfig
) -> tuple[list[int], list[int], list[int]]:
    """Token ids, image start positions and image token counts of a chat whose contents hold IMAGE_MARKERs."""
    counts = [estimate_image_tokens(i.width, i.height, cfg) for i in (probe_image(d, cfg.limits) for d in images)]
    ids, starts = expand_image_markers(tokenizer, render_chat(tokenizer, messages), counts, cfg.image_token_id)
    return ids, starts, counts


# ---- configuration and weights ---------------------------------------------------------------------------
def placeholder_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return int(vocab.get(SEEDED_PLACEHOLDER, 0))


def read_llava_config(path: str | None) -> dict[str, Any] | None:
    """The LLaVA config.json of an HF directory, or None for any other model."""
    if not path or not Path(path, "config.json").is_file():
        return None
    cfg = json.loads(Path(path, "config.json").read_text())
    if cfg.get("model_type") != "llava":
        return None
    return cfg


def multimodal_config(
    model_path: str | None,
    tokenizer: Any,
    seed: int = 0,
    max_grid: int = 2,
    limits: ImageLimits | None = None,
    vision: VisionConfig | None = None,
) -> MultimodalConfig:
    """From an HF LLaVA directory, else the seeded default tower (``vision`` overrides its shape)."""
    llava = read_llava_config(model_path)
    limits = limits or ImageLimits()
    if llava is not None:
        return MultimodalConfig(
            VisionConfig.from_hf(llava.get("vision_config", {}), llava),
            int(llava.get("image_token_index", llava.get("image_token_id", 32000))),
            max_grid,
            seed,
            limits,
        )
    return MultimodalConfig(vision or VisionConfig(), placeholder_id(tokenizer), max_grid, seed, limits)


def build_vision_tower(model_path: str | None, cfg: MultimodalConfig, text: ModelConfig) -> VisionTower:
    """The LLaVA checkpoint's tower when ``model_path`` is one, else the seeded untrained tower."""
    if read_llava_config(model_path) is None:
        return VisionTower.seeded(cfg.vision, text.hidden_size, cfg.seed)
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(str(model_path)).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_path}: no safetensors files")
    for f in files:
        state.update({k: v for k, v in load_file(str(f)).items() if "vision_tower" in k or "projector" in k})
    tower = VisionTower(cfg.vision, text.hidden_size)
    tower.load_llava_state(state)
    return tower


# ---- the LM half of an HF LLaVA directory (used by models/loader.py) -------------------------------------
def llava_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config.json fields of a LLaVA config (``text_config``, Llama family)."""
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "llama")
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
        if key not in text and key in cfg:
            text[key] = cfg[key]
    return text


def llava_lm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA LM weight names -> Llama names (``language_model.model.*`` or ``model.language_model.*`` ->
    ``model.*``; ``language_model.lm_head`` -> ``lm_head``). Vision and projector weights are left out."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for old, new in (
            ("language_model.model.", "model."),
            ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."),
            ("lm_head.", "lm_head."),
        ):
            if name.startswith(old):
                out[new + name.removeprefix(old)] = tensor
                break
    return out
