"""Vision tower (CLIP-style ViT) and the LLaVA 2-layer MLP projector.

The ViT follows HF ``CLIPVisionModel``: conv patch embedding (no bias), a class token, learned position
embeddings, a pre-LayerNorm, pre-LN transformer blocks (quick-GELU MLP) and features taken from layer
``feature_layer`` (LLaVA: -2) with the class token dropped. The projector maps each patch feature to the
language model's hidden size: Linear -> GELU -> Linear (HF ``LlavaMultiModalProjector``).

``VisionTower.seeded`` builds deterministic, UNTRAINED weights (a fixed torch seed): outputs carry no
meaning, but shapes, numerics, batching and transfer are real. ``load_llava_state`` loads HF LLaVA names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stageserve.models.config import ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 64  # one tile is image_size x image_size pixels
    patch_size: int = 8
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2  # hidden state whose patch rows become image tokens (LLaVA's vision_feature_layer)
    hidden_act: str = "quick_gelu"
    projector_act: str = "gelu"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or self.hidden_size % self.num_heads:
            raise ValueError("vision: image_size must divide by patch_size and hidden_size by num_heads")

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, vision: dict[str, Any], llava: dict[str, Any]) -> VisionConfig:
        """From a LLaVA config.json (``vision_config`` of a CLIP vision model and the top-level fields)."""
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ModelLoadError(f"vision tower {vision.get('model_type')!r} is not supported (CLIP only)")
        if llava.get("vision_feature_select_strategy", "default") != "default":
            raise ModelLoadError("only vision_feature_select_strategy='default' (drop the class token) is supported")
        layer = llava.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ModelLoadError("only a single vision_feature_layer is supported")
        return cls(
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32),
            hidden_size=vision.get("hidden_size", 768),
            num_layers=vision.get("num_hidden_layers", 12),
            num_heads=vision.get("num_attention_heads", 12),
            intermediate_size=vision.get("intermediate_size", 3072),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
            feature_layer=layer,
            hidden_act=vision.get("hidden_act", "quick_gelu"),
            projector_act=llava.get("projector_hidden_act", "gelu"),
        )


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return F.gelu(x, approximate="tanh")
    raise ModelLoadError(f"activation {name!r} is not supported")


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))
        self.layer_norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        heads = self.cfg.num_heads
        y = self.layer_norm1(x)
        q, k, v = (p(y).view(n, t, heads, h // heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(n, t, h))
        return x + self.fc2(_act(self.cfg.hidden_act, self.fc1(self.layer_norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.tokens_per_tile + 1, cfg.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S] (normalised) -> patch features [N, tokens_per_tile, vision hidden]."""
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight
        x = self.pre_layrnorm(x)
        # hidden_states[i] in HF terms: index 0 is the embeddings, i the output of block i.
        last = self.cfg.feature_layer % (self.cfg.num_layers + 1)
        for block in self.layers[:last]:
            x = block(x)
        return x[:, 1:]


class Projector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(_act(self.act, self.linear_1(x)))


class VisionTower(nn.Module):
    """ViT + projector: normalised tiles [N, 3, S, S] -> image token embeddings [N, tokens_per_tile, text]."""

    def __init__(self, cfg: VisionConfig, text_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_hidden = text_hidden
        self.vision = VisionTransformer(cfg)
        self.projector = Projector(cfg.hidden_size, text_hidden, cfg.projector_act)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixels.to(self.projector.linear_1.weight.dtype)))

    @classmethod
    def seeded(cls, cfg: VisionConfig, text_hidden: int, seed: int = 0) -> VisionTower:
        """Deterministic untrained weights: N(0, 0.02) matrices, zero biases, unit norms (same on every host)."""
        gen = torch.Generator().manual_seed(seed)
        tower = cls(cfg, text_hidden)
        with torch.no_grad():
            for name, p in sorted(tower.named_parameters()):
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return tower.eval()

    @torch.no_grad()
    def load_llava_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads HF LLaVA names (``vision_tower.vision_model.*`` or ``vision_tower.*``, and
        ``multi_modal_projector.*``, with or without a ``model.`` prefix)."""
        own = self.state_dict()
        for name in own:
            key = _hf_vision_name(name)
            names = (key, key.replace("vision_tower.vision_model.", "vision_tower."))  # transformers 4 / 5 names
            tensor = next((state[p + k] for p in ("", "model.") for k in names if p + k in state), None)
            if tensor is None:
                raise ModelLoadError(f"weight {key} missing from the LLaVA checkpoint")
            if name.endswith("position_embedding.weight") or tensor.shape == own[name].shape:
                own[name].copy_(tensor.float().reshape(own[name].shape))
            else:
                raise ModelLoadError(f"weight {key}: shape {tuple(tensor.shape)} != {tuple(own[name].shape)}")
        self.eval()


def _hf_vision_name(name: str) -> str:
    if name.startswith("projector."):
        return "multi_modal_projector." + name.removeprefix("projector.")
    rest = name.removeprefix("vision.")
    for ours, theirs in (
        ("patch_embedding", "embeddings.patch_embedding"),
        ("class_embedding", "embeddings.class_embedding"),
        ("position_embedding", "embeddings.position_embedding"),
    ):
        if rest.startswith(ours):
            return "vision_tower.vision_model." + theirs + rest.removeprefix(ours)
    if rest.startswith("pre_layrnorm"):
        return "vision_tower.vision_model." + rest
    # layers.N.<part>
    _, index, part, *tail = rest.split(".")
    sub = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "out_proj": "self_attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }.get(part, part)
    return f"vision_tower.vision_model.encoder.layers.{index}.{sub}." + ".".join(tail)
