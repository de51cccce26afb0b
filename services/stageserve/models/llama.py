"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) written for the paged engine.

Inputs are flattened across requests: ``input_ids`` and ``positions`` are [T] for the T tokens of one
engine step; attention goes through an ``AttentionStep`` (planned once per step, run per layer), which
owns the paged KV cache writes and reads. q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stageserve.models.config import ModelConfig, ModelLoadError, RopeScaling


class AttentionStep(Protocol):
    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (post-RoPE) -> attention output [T, Hq, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """Rotate-half RoPE (HF convention) with a cos/sin table precomputed in fp32."""

    def __init__(self, cfg: ModelConfig) -> None:
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Not module buffers: the table stays fp32 whatever dtype the model is cast to.
        self.cos = emb.cos()
        self.sin = emb.sin()

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for these positions (gathered once per forward, shared by all layers)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # ZeroC (models/zeroc.py): v_dim < head_dim when V is produced in a truncated basis; qk_basis
        # [Hkv, head_dim, r_qk] projects post-RoPE q/k when set. Defaults leave the layer unchanged.
        self.v_dim = self.head_dim
        self.qk_basis: torch.Tensor | None = None
        self.q_basis: torch.Tensor | None = None  # q's own map when it differs from k's (whitened ZeroC)
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: AttentionStep) -> torch.Tensor:
        t = x.shape[0]
        v_size = self.num_kv_heads * self.v_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, v_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.v_dim)
        q, k = apply_rope(q, k, rope)
        if self.qk_basis is not None:
            q, k = project_qk(q, k, self.qk_basis, self.head_dim, self.q_basis)
        out = step.run(self.layer, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    @property
    def kv_dims(self) -> tuple[int, int]:
        """(K, V) values per token per KV head that this layer caches."""
        return (self.head_dim if self.qk_basis is None else self.qk_basis.shape[-1]), self.v_dim


def project_qk(
    q: torch.Tensor, k: torch.Tensor, basis: torch.Tensor, head_dim: int, q_basis: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroC: post-RoPE q [T, Hq, d], k [T, Hkv, d] -> [T, ·, r] in each KV head's basis [Hkv, d, r] (a query
    head uses its KV head's basis, or ``q_basis`` when given). q is scaled by √(r/d) so attention's default
    1/√r scale equals 1/√d."""
    group = q.shape[1] // basis.shape[0]
    r = basis.shape[-1]
    qb = basis if q_basis is None else q_basis
    q = torch.einsum("thd,hdr->thr", q, qb.repeat_interleave(group, 0)) * math.sqrt(r / head_dim)
    return q, torch.einsum("thd,hdr->thr", k, basis)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], step: AttentionStep) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    @classmethod
    def empty(cls, cfg: ModelConfig) -> LlamaForCausalLM:
        """A model with uninitialised parameters (to be filled by ``load_hf_state``), built without the
        cost of random initialisation."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        model.rotary = Rotary(cfg)
        return model

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        step: AttentionStep,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (call ``logits`` on the rows needed).
        ``inputs_embeds`` [T, hidden], when given, replaces the token embedding lookup (image tokens)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rotary.table(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, step)
        return self.norm(x)

    def kv_head_dims(self) -> list[tuple[int, int]]:
        """(K, V) cached values per token per KV head, per layer (head_dim unless ZeroC-compressed)."""
        return [layer.self_attn.kv_dims for layer in self.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Loads weights named as in HF checkpoints (model.layers.N.self_attn.q_proj.weight, ...)."""
        cfg = self.config
        take = _Taker(state, cfg.name)
        self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        head = take.optional("lm_head.weight")
        self.lm_head.weight.copy_(
            head if head is not None and not cfg.tie_word_embeddings else self.embed_tokens.weight
        )
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            attn.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            if cfg.attention_bias:
                attn.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            )
            layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
            if cfg.mlp_bias:
                layer.mlp.gate_up_proj.bias.copy_(
                    torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")])
                )
                layer.mlp.down_proj.bias.copy_(take(p + "mlp.down_proj.bias"))
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        self.to(dtype)


class _Taker:
    def __init__(self, state: dict[str, torch.Tensor], name: str) -> None:
        self.state = state
        self.name = name

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ModelLoadError(f"weight {key} missing from {self.name}")
        return self.state[key].float()

    def optional(self, key: str) -> torch.Tensor | None:
        return self.state[key].float() if key in self.state else None
