"""ZeroC (arXiv 2408.04107 v1, papers.md §2): rotate Q/K and V into learned orthonormal bases, keep the
first r coordinates.

* Q/K, per layer and KV head: X = [post-RoPE q rows of each query head of the group; k rows, weighted √G]
  = U Σ R_qkᵀ. Run time: q̃ = RoPE(q)·R_r, k̃ = RoPE(k)·R_r (``llama.project_qk``); the cache holds k̃.
* V/O, per layer and KV head: the SVD of [V rows; rows of W_o[h]ᵀ for the G query heads of the group]
  (each block scaled to unit Frobenius norm; papers.md leaves the weighting open) gives R_vo.
  W_v′ = R_vᵀ·W_v, W_o′[h] = W_o[h]·R_v: V is produced and cached in the r_v basis, W_o′ absorbs the rest.
* Ranks are per layer (every KV head of a layer shares them, so the cache needs no padding).

A compressed directory holds ``model.safetensors`` (HF names; v_proj/o_proj already truncated and
``self_attn.qk_basis`` [Hkv, d, r_qk] per layer), ``config.json``, the tokenizer and ``zeroc.json`` (ranks
and provenance). ``loader.load_model`` detects ``zeroc.json`` and calls :func:`load_compressed`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stageserve.engine.attention import NoCacheAttention
from stageserve.models.config import ModelConfig, ModelLoadError
from stageserve.models.llama import LlamaForCausalLM

ZEROC_FILE = "zeroc.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class RankPlan:
    """Per-layer ranks: ``qk[l]`` values of K (and q) per head, ``v[l]`` values of V per head."""

    qk: tuple[int, ...]
    v: tuple[int, ...]

    @classmethod
    def uniform(cls, num_layers: int, r_qk: int, r_v: int) -> RankPlan:
        return cls((r_qk,) * num_layers, (r_v,) * num_layers)

    def kv_fraction(self, head_dim: int) -> float:
        """Cached values per token relative to the uncompressed 2·d per layer and head."""
        return (sum(self.qk) + sum(self.v)) / (2 * head_dim * len(self.qk))

    def validate(self, cfg: ModelConfig) -> None:
        if len(self.qk) != cfg.num_hidden_layers or len(self.v) != cfg.num_hidden_layers:
            raise ValueError(f"rank plan: need {cfg.num_hidden_layers} ranks per kind")
        for r in (*self.qk, *self.v):
            if not 8 <= r <= cfg.head_dim or r % 8:
                raise ValueError(f"rank plan: ranks must be multiples of 8 in [8, {cfg.head_dim}], got {r}")


@dataclass
class Bases:
    """Per layer: qk [Hkv, d, d] (the k map; also q's unless ``q`` is set) and vo [Hkv, d, d] (the V map,
    W_v′ = voᵀ·W_v; W_o′[h] = W_o[h]·vo_out, vo_out = vo unless set), columns by decreasing σ, and the σ²
    spectra [Hkv, d]. ``q``/``vo_out`` are set by the whitened method only."""

    qk: list[torch.Tensor]
    vo: list[torch.Tensor]
    qk_energy: list[torch.Tensor]
    vo_energy: list[torch.Tensor]
    q: list[torch.Tensor] | None = None
    vo_out: list[torch.Tensor] | None = None
    method: str = "paper"

    def kept_energy(self, layer: int, kind: str, rank: int) -> float:
        """Mean over KV heads of Σ_{i≤r} σ_i² / Σ σ_i² (papers.md §2.4 E(r))."""
        e = (self.qk_energy if kind == "qk" else self.vo_energy)[layer]
        return float((e[:, :rank].sum(-1) / e.sum(-1)).mean())


class _GramRecorder:
    """An AttentionStep that accumulates per-head Gram matrices of post-RoPE q/k and of v, then attends."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        zeros = lambda: torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float64)  # noqa: E731
        self.q = [zeros() for _ in range(num_layers)]
        self.k = [zeros() for _ in range(num_layers)]
        self.v = [zeros() for _ in range(num_layers)]
        self.attn = NoCacheAttention()

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hkv = k.shape[1]
        group = q.shape[1] // hkv
        qg = q.double().transpose(0, 1).reshape(hkv, group * q.shape[0], -1)  # query heads of a group stacked
        kd = k.double().transpose(0, 1)
        self.q[layer] += qg.transpose(1, 2) @ qg
        self.k[layer] += kd.transpose(1, 2) @ kd
        vd = v.double().transpose(0, 1)
        self.v[layer] += vd.transpose(1, 2) @ vd
        return self.attn.run(layer, q, k, v)


def _eigh_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors (columns, decreasing σ) and σ² of X from XᵀX [H, d, d]."""
    evals, evecs = torch.linalg.eigh(gram)
    return evecs.flip(-1).float(), evals.flip(-1).clamp(min=0).float()


METHODS = ("paper", "whitened")


@torch.inference_mode()
def calibrate(
    model: LlamaForCausalLM, ids: list[int], window: int = 1024, progress: bool = False, method: str = "paper"
) -> Bases:
    """Runs the calibration tokens (windows of ``window``) and returns the ZeroC bases of every layer.

    ``paper``: orthonormal R_qk from the stacked post-RoPE q/k rows and R_vo from [V; W_oᵀ] (papers.md §2.2-2.3).
    ``whitened`` [ours]: the best rank-r factorisations of the calibration scores Q·Kᵀ and head outputs
    V·W_o (SVD after whitening by the q/k/v Gram matrices); still folded into W_v/W_o and one map per q/k."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    from tqdm import tqdm

    cfg = model.config
    rec = _GramRecorder(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    chunks = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    for chunk in tqdm(chunks, desc="calibrate", unit="window", disable=not progress):
        model(torch.tensor(chunk), torch.arange(len(chunk)), rec)
    if method == "whitened":
        return _whitened(model, rec)
    qk, vo, qk_e, vo_e = [], [], [], []
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in range(cfg.num_hidden_layers):
        r, e = _eigh_desc(rec.q[layer] + group * rec.k[layer])
        qk.append(r)
        qk_e.append(e)
        r, e = _eigh_desc(rec.v[layer] / _fro2(rec.v[layer]) + _wo_gram(model, layer))
        vo.append(r)
        vo_e.append(e)
    return Bases(qk, vo, qk_e, vo_e)


def _chol(gram: torch.Tensor) -> torch.Tensor:
    """L with L·Lᵀ = gram (+ a tiny ridge so rank-deficient calibration stays invertible)."""
    d = gram.shape[-1]
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(d, dtype=gram.dtype)
    return torch.linalg.cholesky(gram + ridge)


def _whitened(model: LlamaForCausalLM, rec: _GramRecorder) -> Bases:
    """Q·Kᵀ = (Q L_q⁻ᵀ)(L_qᵀ L_k)(L_k⁻¹ Kᵀ); SVD L_qᵀL_k = U S Wᵀ: q map L_q⁻ᵀ U S^½, k map L_k⁻ᵀ W S^½.
    V·W_cat = (V L_v⁻ᵀ)(L_vᵀ W_cat); SVD L_vᵀ W_cat = U S Yᵀ: V map L_v⁻ᵀ U (whitened channels), W_o map L_v U."""
    q_maps, k_maps, v_maps, o_maps, qk_e, vo_e = [], [], [], [], [], []
    for layer in range(model.config.num_hidden_layers):
        lq, lk, lv = _chol(rec.q[layer]), _chol(rec.k[layer]), _chol(rec.v[layer])
        u, s, wh = torch.linalg.svd(lq.transpose(1, 2) @ lk)
        root = s.sqrt()[:, None, :]
        q_maps.append((torch.linalg.solve_triangular(lq.transpose(1, 2), u, upper=True) * root).float())
        k_map = torch.linalg.solve_triangular(lk.transpose(1, 2), wh.transpose(1, 2), upper=True)
        k_maps.append((k_map * root).float())
        qk_e.append((s**2).float())
        w_cat = _wo_cat(model, layer)  # [Hkv, d, G·D]
        u, s, _ = torch.linalg.svd(lv.transpose(1, 2) @ w_cat, full_matrices=False)
        v_maps.append(torch.linalg.solve_triangular(lv.transpose(1, 2), u, upper=True).float())
        o_maps.append((lv @ u).float())
        vo_e.append((s**2).float())
    return Bases(k_maps, v_maps, qk_e, vo_e, q=q_maps, vo_out=o_maps, method="whitened")


def _wo_cat(model: LlamaForCausalLM, layer: int) -> torch.Tensor:
    """Per KV head: [W_o[h]ᵀ for its query heads] side by side, [Hkv, d, G·D] (float64)."""
    attn = model.layers[layer].self_attn
    w = attn.o_proj.weight.detach().double()  # [D, Hq·d]
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    return w.reshape(w.shape[0], hkv, hq // hkv, d).permute(1, 3, 2, 0).reshape(hkv, d, -1)


def _fro2(gram: torch.Tensor) -> torch.Tensor:
    """‖X‖_F² per head from XᵀX (the trace), shaped to divide [H, d, d]."""
    return gram.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]


def _wo_gram(model: LlamaForCausalLM, layer: int) -> torch.Tensor:
    """Per KV head: Σ over its query heads of W_o[h]·W_o[h]ᵀ-style Gram (d × d) of the rows of W_o[h]ᵀ,
    normalised to unit Frobenius norm (trace) like the V block."""
    attn = model.layers[layer].self_attn
    w = attn.o_proj.weight.detach().double()  # [D, Hq·d]
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    slices = w.reshape(w.shape[0], hkv, hq // hkv, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)  # [Hkv, G·D, d]
    gram = slices.transpose(1, 2) @ slices
    return gram / _fro2(gram)


@dataclass
class _Original:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor


class ZeroCModel:
    """Holds a model's original attention weights so any rank plan can be applied (and re-applied) in place."""

    def __init__(self, model: LlamaForCausalLM, bases: Bases) -> None:
        self.model = model
        self.bases = bases
        self.original = [
            _Original(
                layer.self_attn.qkv_proj.weight.detach().clone(),
                None if layer.self_attn.qkv_proj.bias is None else layer.self_attn.qkv_proj.bias.detach().clone(),
                layer.self_attn.o_proj.weight.detach().clone(),
            )
            for layer in model.layers
        ]

    @torch.no_grad()
    def apply(self, plan: RankPlan) -> None:
        plan.validate(self.model.config)
        for i, layer in enumerate(self.model.layers):
            o = self.original[i]
            b = self.bases
            rv, rq = plan.v[i], plan.qk[i]
            out_map = None if b.vo_out is None else b.vo_out[i][:, :, :rv]
            w_qkv, b_qkv, w_o = compress_layer(layer.self_attn, o.qkv_w, o.qkv_b, o.o_w, b.vo[i][:, :, :rv], out_map)
            q_map = None if b.q is None else b.q[i][:, :, :rq]
            set_layer(layer.self_attn, w_qkv, b_qkv, w_o, b.qk[i][:, :, :rq], q_map)

    @torch.no_grad()
    def restore(self) -> None:
        """Puts the original (uncompressed) weights back."""
        for i, layer in enumerate(self.model.layers):
            o = self.original[i]
            set_layer(layer.self_attn, o.qkv_w, o.qkv_b, o.o_w, None)


def _is_identity(basis: torch.Tensor) -> bool:
    eye = torch.eye(basis.shape[-1], dtype=basis.dtype)
    return basis.shape[-1] == basis.shape[-2] and bool(torch.equal(basis, eye.expand_as(basis)))


def compress_layer(
    attn: nn.Module,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    o_w: torch.Tensor,
    r_v: torch.Tensor,
    o_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Original fused qkv weight/bias and o_proj weight + the V map [Hkv, d, r_v] (and the W_o map, default the
    same) -> compressed weights."""
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rv = r_v.shape[-1]
    r = r_v.to(qkv_w.dtype)
    q_rows, v_w = qkv_w[: (hq + hkv) * d], qkv_w[(hq + hkv) * d :]
    v_new = torch.einsum("hdr,hdi->hri", r, v_w.reshape(hkv, d, -1)).reshape(hkv * rv, -1)  # R_vᵀ·W_v
    b_new = None
    if qkv_b is not None:
        b_v = torch.einsum("hdr,hd->hr", r, qkv_b[(hq + hkv) * d :].reshape(hkv, d)).reshape(-1)
        b_new = torch.cat([qkv_b[: (hq + hkv) * d], b_v])
    group = hq // hkv
    o = o_w.reshape(o_w.shape[0], hq, d)
    om = r if o_map is None else o_map.to(qkv_w.dtype)
    o_new = torch.einsum("ohd,hdr->ohr", o, om.repeat_interleave(group, 0)).reshape(o_w.shape[0], hq * rv)
    return torch.cat([q_rows, v_new]), b_new, o_new


def set_layer(
    attn: nn.Module,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor | None,
    o_w: torch.Tensor,
    basis: torch.Tensor | None,
    q_basis: torch.Tensor | None = None,
) -> None:
    """Installs compressed weights (replacing the Linear modules when shapes change) and the Q/K basis."""
    dtype = attn.o_proj.weight.dtype
    attn.v_dim = o_w.shape[1] // attn.num_heads
    attn.qkv_proj = _linear(qkv_w, qkv_b, dtype)
    attn.o_proj = _linear(o_w, None, dtype)
    attn.qk_basis = None if basis is None else basis.to(dtype).contiguous()
    attn.q_basis = None if q_basis is None else q_basis.to(dtype).contiguous()


def _linear(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.to(dtype).contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.to(dtype).contiguous(), requires_grad=False)
    return lin


# ---- saving and loading ---------------------------------------------------------------------------------
def save_compressed(model: LlamaForCausalLM, tokenizer: Any, plan: RankPlan, out: str, provenance: dict) -> None:
    """Writes a self-contained compressed model directory (weights of ``model`` as currently applied)."""
    from safetensors.torch import save_file

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
    }
    cfg = model.config
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    sizes = [cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim]
    for i, layer in enumerate(model.layers):
        p, attn = f"model.layers.{i}.", layer.self_attn
        sizes_i = [*sizes, cfg.num_key_value_heads * attn.v_dim]
        for name, w in zip("qkv", attn.qkv_proj.weight.split(sizes_i), strict=True):
            state[p + f"self_attn.{name}_proj.weight"] = w
        if attn.qkv_proj.bias is not None:
            for name, b in zip("qkv", attn.qkv_proj.bias.split(sizes_i), strict=True):
                state[p + f"self_attn.{name}_proj.bias"] = b
        state[p + "self_attn.o_proj.weight"] = attn.o_proj.weight
        basis = (
            attn.qk_basis
            if attn.qk_basis is not None
            else torch.eye(cfg.head_dim).expand(cfg.num_key_value_heads, -1, -1)
        )
        state[p + "self_attn.qk_basis"] = basis
        if attn.q_basis is not None:
            state[p + "self_attn.q_basis"] = attn.q_basis
        gate, up = layer.mlp.gate_up_proj.weight.split(cfg.intermediate_size)
        state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = gate, up
        state[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(path / WEIGHTS_FILE))
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    tokenizer.save_pretrained(str(path))
    meta = {"method": "zeroc", "paper": "arXiv 2408.04107 v1", "ranks": asdict(plan), **provenance}
    meta["kv_fraction"] = plan.kv_fraction(cfg.head_dim)
    (path / ZEROC_FILE).write_text(json.dumps(meta, indent=2))


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """An HF config.json equivalent of ``cfg`` (what ``ModelConfig.from_hf`` reads back)."""
    out: dict[str, Any] = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
    }
    if cfg.rope_scaling.rope_type != "default":
        out["rope_scaling"] = asdict(cfg.rope_scaling)
    if cfg.sliding_window is not None:
        out["sliding_window"] = cfg.sliding_window
        out["use_sliding_window"] = True
    return out


def is_zeroc_dir(path: str) -> bool:
    return (Path(path) / ZEROC_FILE).is_file()


def read_plan(path: str) -> RankPlan:
    try:
        ranks = json.loads((Path(path) / ZEROC_FILE).read_text())["ranks"]
        return RankPlan(tuple(int(r) for r in ranks["qk"]), tuple(int(r) for r in ranks["v"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"corrupt {ZEROC_FILE} in {path}: {exc}") from exc


def load_compressed(path: str, dtype: torch.dtype) -> Any:
    """A ZeroC directory -> ``LoadedModel`` (weights installed in their compressed shapes)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from stageserve.models.loader import LoadedModel, load_tokenizer, model_display_name

    try:
        config = ModelConfig.from_hf(json.loads((Path(path) / "config.json").read_text()), model_display_name(path))
        state = load_file(str(Path(path) / WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot read ZeroC model {path}: {exc}") from exc
    plan = read_plan(path)
    plan.validate(config)
    tokenizer = load_tokenizer(path)
    model = LlamaForCausalLM.empty(config)
    hkv, d = config.num_key_value_heads, config.head_dim
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        out = (config.num_attention_heads + hkv) * d + hkv * plan.v[i]
        bias = torch.empty(out) if config.attention_bias else None
        set_layer(
            attn,
            torch.empty(out, config.hidden_size),
            bias,
            torch.empty(config.hidden_size, config.num_attention_heads * plan.v[i]),
            None,
        )
    try:
        model.load_hf_state(state, dtype)
        for i, layer in enumerate(model.layers):
            basis = state[f"model.layers.{i}.self_attn.qk_basis"].float()
            if basis.shape != (hkv, d, plan.qk[i]):
                raise ModelLoadError(f"qk_basis of layer {i} in {path} has shape {tuple(basis.shape)}")
            layer.self_attn.qk_basis = basis.to(dtype) if not _is_identity(basis) else None
            q_basis = state.get(f"model.layers.{i}.self_attn.q_basis")
            if q_basis is not None:
                if q_basis.shape != basis.shape:
                    raise ModelLoadError(f"q_basis of layer {i} in {path} has shape {tuple(q_basis.shape)}")
                layer.self_attn.q_basis = q_basis.to(dtype)
    except (RuntimeError, KeyError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"weights in {path} do not match its zeroc.json: {str(exc).splitlines()[0]}") from exc
    model.eval()
    eos = set(config.eos_token_ids) | ({int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set())
    from dataclasses import replace

    config = replace(config, eos_token_ids=tuple(sorted(eos)))
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, path=path, name=model_display_name(path))


def kv_values_per_token(plan: RankPlan | None, cfg: ModelConfig) -> int:
    """Cached K+V values per token over all layers and KV heads."""
    if plan is None:
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return (sum(plan.qk) + sum(plan.v)) * cfg.num_key_value_heads


def page_bytes_per_token(plan: RankPlan | None, cfg: ModelConfig, fmt_name: str, page_size: int = 64) -> float:
    """Steady-state KV bytes per token (closed pages) over all layers for a page format, K fields sized by
    r_qk and V fields by r_v (each half of a symmetric PageFormat of that dim; 8-byte field alignment kept)."""
    from stageserve.kvcodec.format import PageFormat

    def half(dim: int) -> float:
        return PageFormat(fmt_name, cfg.num_key_value_heads, dim, page_size=page_size).bytes_per_token_steady / 2

    qk = plan.qk if plan else (cfg.head_dim,) * cfg.num_hidden_layers
    v = plan.v if plan else (cfg.head_dim,) * cfg.num_hidden_layers
    return sum(half(a) + half(b) for a, b in zip(qk, v, strict=True))
