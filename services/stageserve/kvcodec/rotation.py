"""Fixed orthogonal K rotations of the ``*r`` page formats (e.g. ``hack2r``), and a format-aware page round trip.

A format with ``k_rotation`` stores each head's post-RoPE K as ``k @ R`` (R [d, d] orthogonal, the same for
every head, layer and page) before per-channel quantization; queries are rotated the same way, so
``(q R)·(k R)ᵀ = q·kᵀ`` and scores are unchanged while outlier channels are spread over all channels.

* ``hadamard``: the normalized Sylvester Hadamard matrix H/√d (d a power of two).
* ``random``: a seeded random orthogonal matrix (QR of a Gaussian matrix, seed 0; any d).

The matrices are deterministic functions of (kind, d), so prefill and decode agree without sending them.
"""

from __future__ import annotations

import functools
import math

import torch

from stageserve.kvcodec.format import PageFormat
from stageserve.kvcodec.reference import roundtrip_page

ROTATIONS = ("none", "hadamard", "random")


@functools.cache
def rotation_matrix(kind: str, dim: int) -> torch.Tensor:
    """Orthogonal [dim, dim] float32 matrix of ``kind`` (see the module docstring)."""
    if kind == "hadamard":
        if dim < 1 or dim & (dim - 1):
            raise ValueError(f"k_rotation: hadamard needs a power-of-two head_dim, got {dim}")
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(dim)
    if kind == "random":
        gen = torch.Generator().manual_seed(0)
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()
    raise ValueError(f"k_rotation: unknown rotation {kind!r}; expected one of {ROTATIONS[1:]}")


def rotate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x [..., d] -> x @ R (float32); identity for ``none``."""
    if kind == "none":
        return x
    return x.float() @ rotation_matrix(kind, x.shape[-1])


def unrotate(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`rotate`: x @ Rᵀ."""
    if kind == "none":
        return x
    return x.float() @ rotation_matrix(kind, x.shape[-1]).T


def rotation_for(fmt: PageFormat, dim: int) -> str:
    """The K rotation of ``fmt`` for a K of ``dim`` values per head (a ZeroC layer may have fewer than head_dim)."""
    if fmt.k_rotation == "none" or dim == fmt.head_dim:
        return fmt.k_rotation
    return "hadamard" if dim & (dim - 1) == 0 else "random"


def format_roundtrip(fmt: PageFormat, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a closed page of ``fmt`` represents, in the model's (unrotated) coordinates.

    k, v [..., Π, d] -> K rotated, quantized per channel, dequantized and rotated back; V quantized per token
    over chunks of ``fmt.v_chunk`` (or that of V's own width when it differs). Attention over these values
    equals attention of rotated queries on the stored (rotated) codes."""
    rot = rotation_for(fmt, k.shape[-1])
    v_chunk = fmt.v_chunk
    if v.shape[-1] != fmt.head_dim:
        v_chunk = PageFormat(fmt.format, fmt.num_kv_heads, v.shape[-1], page_size=fmt.page_size).v_chunk
    k_hat, v_hat = roundtrip_page(rotate(k, rot), v, fmt.base_format, (fmt.bits_k, fmt.bits_v), v_chunk)
    return unrotate(k_hat, rot), v_hat
