"""Decode attention time per step: HACK (attention on codes) vs fused dequant vs BF16 (vs FP8 where available).

One layer, one decode step (one query per sequence), B sequences of T KV tokens each, a model's head shape
(Llama-3.1-8B: 32 q / 8 KV heads, d=128; 70B: 64 q / 8 KV, d=128). Each sequence has its own pages (no
sharing), so every step really reads B·T tokens of KV.

Implementations
* CUDA: the Triton kernels (``hack_decode``, ``dequant_decode`` on the same pages, ``bf16_decode``), timed
  with ``triton.testing.do_bench``. No FP8 kernel exists yet, so there is no FP8 row.
* CPU: the torch paths: ``paged_decode_attention_torch`` (hack, on the codes), ``dequant_decode_attention_torch``
  (dequantize each page chunk, then float attention), ``dequant+sdpa`` (dequantize every page into a dense
  float tensor, then SDPA), ``fp8+sdpa`` (E4M3 pages upcast, then SDPA) and ``bf16 sdpa`` (gather BF16
  pages, SDPA), timed with ``time.perf_counter`` (median of ``iters``).

Bytes per step (what the roofline counts; one layer):
* code formats: B·(J·layer_page_bytes + (S + n_open)·2·H·d·2), with J = (T − S) // Π closed pages;
* bf16: B·T·2·H·d·2;  fp8: B·T·2·H·d + per-page scales;
* plus q and the output (B·Hq·d·(2 + 4)), negligible.
FLOPs per step: 4·B·Hq·T·d (QK and PV). Roofline time = bytes / peak bandwidth: the datasheet HBM rate
on a known GPU, and on CPU a measured copy bandwidth (read + write of a 1 GiB tensor, counted as 2×).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

MODELS = {"8b": (32, 8, 128), "70b": (64, 8, 128)}  # (q heads, KV heads, head_dim)
CPU_MEMORY_CAP = 6 * 2**30  # skip CPU cases whose torch baselines would need more float K/V than this
GPU_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "A6000": 0.768e12, "L4": 0.3e12}


@dataclass
class Row:
    device: str
    model: str
    batch: int
    kv_len: int
    impl: str
    ms: float
    bytes: int
    gbps: float
    roofline_ms: float
    speedup_vs_bf16: float = 0.0
    rel_err_vs_bf16: float = 0.0


def add_bench_kernels_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``stageserve bench kernels`` on the ``bench`` subparsers."""
    p = bench_subparsers.add_parser("kernels", help="decode attention per step: hack vs fused dequant vs bf16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--models", default="8b,70b", help="comma-separated head configs: 8b, 70b")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (CPU default 1,8; GPU 1,8,32)")
    p.add_argument(
        "--kv-len", default=None, help="comma-separated KV lengths (CPU default 1024,4096,16384; GPU 1K..128K)"
    )
    p.add_argument("--format", default="hack2", help="code format of the hack/dequant rows (hack2, hack4, ...)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="timed repetitions on CPU (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.set_defaults(func=run_cli)
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_cli(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    gpu = device == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    batches = _ints(args.batch) if args.batch else ([1, 8, 32] if gpu else [1, 8])
    lens = _ints(args.kv_len) if args.kv_len else ([1024, 4096, 16384, 32768, 131072] if gpu else [1024, 4096, 16384])
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"models: unknown head config {m!r}; expected {sorted(MODELS)}")
    bandwidth, dev_name = _bandwidth(device)
    print(f"device: {dev_name}; roofline bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows: list[Row] = []
    for model in models:
        for b in batches:
            for t in lens:
                need = 2 * b * t * MODELS[model][0] * MODELS[model][2] * 4  # SDPA's GQA-expanded float K and V
                if not gpu and need > CPU_MEMORY_CAP:
                    print(f"{model:>4} B={b:<3} T={t:<7} skipped: ~{need / 2**30:.1f} GiB of float K/V", flush=True)
                    continue
                rows += bench_case(device, dev_name, model, b, t, args.format, args.page_size, args.iters, bandwidth)
                for r in rows[-_impl_count(gpu) :]:
                    print(_fmt(r), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=2)
    return 0


def _impl_count(gpu: bool) -> int:
    return 3 if gpu else 5


def _fmt(r: Row) -> str:
    return (
        f"{r.model:>4} B={r.batch:<3} T={r.kv_len:<7} {r.impl:<14} {r.ms:9.3f} ms  {r.bytes / 2**20:9.1f} MiB  "
        f"{r.gbps:7.1f} GB/s  roofline {r.roofline_ms:8.3f} ms  x{r.speedup_vs_bf16:5.2f} vs bf16  "
        f"err {r.rel_err_vs_bf16:.3f}"
    )


def _bandwidth(device: str) -> tuple[float, str]:
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, bw in GPU_BANDWIDTH.items():
            if key in name:
                return bw, name
        return 2.0e12, f"{name} (bandwidth unknown, assuming 2 TB/s)"
    x = torch.empty(2**28, dtype=torch.float32)  # 1 GiB
    x.fill_(1.0)
    y = torch.empty_like(x)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / min(times), f"CPU ({torch.get_num_threads()} threads, measured copy bandwidth)"


def _time_cpu(fn: Callable[[], object], iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _time_gpu(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def bench_case(
    device: str,
    dev_name: str,
    model: str,
    batch: int,
    kv_len: int,
    fmt_name: str,
    page_size: int,
    iters: int,
    bandwidth: float,
) -> list[Row]:
    """All implementations for one (model, batch, KV length); the first row's output is the accuracy anchor."""
    import torch

    from stageserve.kvcodec.format import PageFormat

    hq, h, d = MODELS[model]
    fmt = PageFormat(fmt_name, h, d, page_size=page_size)
    case = _make_case(fmt, batch, kv_len, hq, device)
    impls = _gpu_impls(case) if device == "cuda" else _cpu_impls(case)
    rows, outs = [], {}
    for name, (fn, nbytes) in impls.items():
        ms = _time_gpu(fn) if device == "cuda" else _time_cpu(fn, iters)
        outs[name] = fn()
        rows.append(Row(dev_name, model, batch, kv_len, name, ms, nbytes, nbytes / ms / 1e6, nbytes / bandwidth * 1e3))
    base = next(r for r in rows if r.impl.startswith("bf16"))
    ref = outs[base.impl].float()
    for r in rows:
        r.speedup_vs_bf16 = base.ms / r.ms
        r.rel_err_vs_bf16 = float((outs[r.impl].float() - ref).norm() / ref.norm())
    del case
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _make_case(fmt, batch: int, kv_len: int, hq: int, device: str) -> dict:
    """Random KV for ``batch`` sequences of ``kv_len`` tokens, stored as code pages + BF16 rows, and as BF16
    pages (and FP8 pages on CPU) holding the same values."""
    import torch

    from stageserve.kvcodec.paged import PagedCodeStore

    h, d, pi = fmt.num_kv_heads, fmt.head_dim, fmt.page_size
    sinks, pages, n_open = fmt.split_tokens(kv_len)
    g = torch.Generator(device=device).manual_seed(0)
    total = batch * pages
    store = PagedCodeStore.allocate(fmt, 1, max(total, 1), device=device)
    chunk = 256
    for lo in range(0, total, chunk):  # quantize in chunks of pages (bounded temporaries)
        n = min(chunk, total - lo)
        k = torch.randn(n, pi, h, d, generator=g, device=device)
        v = torch.randn(n, pi, h, d, generator=g, device=device)
        store.write_pages(0, torch.arange(lo, lo + n, device=device), k, v)
    tables = torch.arange(max(total, batch), device=device).reshape(batch, -1) % max(total, 1)
    o = max(n_open, 1)
    bf = torch.bfloat16
    case = dict(
        q=torch.randn(batch, hq, d, generator=g, device=device),
        store=store,
        layer=0,
        page_tables=tables,
        num_pages=torch.full((batch,), pages, device=device),
        sinks_k=torch.randn(batch, max(sinks, 1), h, d, generator=g, device=device).to(bf),
        sinks_v=torch.randn(batch, max(sinks, 1), h, d, generator=g, device=device).to(bf),
        sink_lens=torch.full((batch,), sinks, device=device),
        open_k=torch.randn(batch, o, h, d, generator=g, device=device).to(bf),
        open_v=torch.randn(batch, o, h, d, generator=g, device=device).to(bf),
        open_lens=torch.full((batch,), n_open, device=device),
    )
    k_bf, v_bf = _dense_values(case)  # [B, T, H, d] float: the same values the code pages hold
    n_bf = -(-kv_len // pi)
    pad = n_bf * pi - kv_len

    def paged(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).to(bf)
        return x.reshape(batch, n_bf, pi, h, d).permute(0, 1, 3, 2, 4).reshape(batch * n_bf, h, pi, d).contiguous()

    case["bf16_pages"] = (paged(k_bf), paged(v_bf))
    case["bf16_tables"] = torch.arange(batch * n_bf, device=device).reshape(batch, n_bf)
    case["seq_lens"] = torch.full((batch,), kv_len, device=device)
    return case


def _dense_values(case: dict):
    """Dequantized page values + the BF16 rows, in sequence order: k, v [B, T, H, d] float32."""
    import torch

    from stageserve.kvcodec.paged import unpack_codes_nd

    store, fmt = case["store"], case["store"].fmt
    b = case["q"].shape[0]
    f = store.gather(0, case["page_tables"]) if int(case["num_pages"][0]) else None
    parts_k = [case["sinks_k"][:, : int(case["sink_lens"][0])].float()]
    parts_v = [case["sinks_v"][:, : int(case["sink_lens"][0])].float()]
    if f is not None:
        kc = unpack_codes_nd(f["k_codes"], fmt.bits_k).float()  # [B, P, H, Π, d]
        k = kc * f["k_scale"].float().unsqueeze(3) + f["k_min"].float().unsqueeze(3)
        vc = unpack_codes_nd(f["v_codes"], fmt.bits_v).float()
        gc, pc = fmt.head_dim // fmt.v_chunk, fmt.v_chunk
        vg = vc.reshape(*vc.shape[:-1], gc, pc)
        v = (vg * f["v_scale"].float().unsqueeze(-1) + f["v_min"].float().unsqueeze(-1)).reshape(vc.shape)
        parts_k.append(k.permute(0, 1, 3, 2, 4).reshape(b, -1, fmt.num_kv_heads, fmt.head_dim))
        parts_v.append(v.permute(0, 1, 3, 2, 4).reshape(b, -1, fmt.num_kv_heads, fmt.head_dim))
    parts_k.append(case["open_k"][:, : int(case["open_lens"][0])].float())
    parts_v.append(case["open_v"][:, : int(case["open_lens"][0])].float())
    return torch.cat(parts_k, 1), torch.cat(parts_v, 1)


def _code_bytes(case: dict) -> int:
    fmt = case["store"].fmt
    b = case["q"].shape[0]
    pages = int(case["num_pages"][0])
    dense_rows = int(case["sink_lens"][0]) + int(case["open_lens"][0])
    qo = b * case["q"].shape[1] * fmt.head_dim * (2 + 4)
    return b * (pages * fmt.layer_page_bytes + dense_rows * fmt.bf16_bytes_per_token) + qo


def _bf16_bytes(case: dict) -> int:
    fmt = case["store"].fmt
    b, hq, d = case["q"].shape
    return b * int(case["seq_lens"][0]) * fmt.bf16_bytes_per_token + b * hq * d * 6


def _fp8_bytes(case: dict) -> int:
    fmt = case["store"].fmt
    b, hq, d = case["q"].shape
    n_pages = case["bf16_pages"][0].shape[0]
    return (
        b * int(case["seq_lens"][0]) * fmt.bf16_bytes_per_token // 2
        + n_pages * 2 * fmt.num_kv_heads * 2
        + b * hq * d * 6
    )


def _gpu_impls(case: dict) -> dict[str, tuple[Callable[[], object], int]]:
    from stageserve_kernels.bf16_decode import bf16_decode_attention
    from stageserve_kernels.dequant_decode import dequant_decode_attention
    from stageserve_kernels.hack_decode import hack_decode_attention

    args = {k: case[k] for k in _CODE_ARGS}
    kp, vp = case["bf16_pages"]
    return {
        "bf16 triton": (lambda: bf16_decode_attention(case["q"], kp, vp, case["bf16_tables"], case["seq_lens"]),
                        _bf16_bytes(case)),
        "dequant triton": (lambda: dequant_decode_attention(**args), _code_bytes(case)),
        "hack triton": (lambda: hack_decode_attention(**args), _code_bytes(case)),
    }  # fmt: skip


_CODE_ARGS = (
    "q", "store", "layer", "page_tables", "num_pages", "sinks_k", "sinks_v", "sink_lens", "open_k", "open_v",
    "open_lens",
)  # fmt: skip


def _cpu_impls(case: dict) -> dict[str, tuple[Callable[[], object], int]]:
    import torch
    import torch.nn.functional as F

    from stageserve.kvcodec.paged import dequant_decode_attention_torch, paged_decode_attention_torch
    from stageserve_kernels.bf16_decode import bf16_decode_attention_torch

    args = {k: case[k] for k in _CODE_ARGS}
    kp, vp = case["bf16_pages"]
    q = case["q"]
    scales = (kp.float().abs().amax(dim=(2, 3), keepdim=True) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
    k8 = (kp.float() / scales.float()).to(torch.float8_e4m3fn)
    v_scales = (vp.float().abs().amax(dim=(2, 3), keepdim=True) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
    v8 = (vp.float() / v_scales.float()).to(torch.float8_e4m3fn)

    def fp8_sdpa():
        k = k8.float() * scales.float()
        v = v8.float() * v_scales.float()
        return bf16_decode_attention_torch(q, k, v, case["bf16_tables"], case["seq_lens"])

    def dequant_sdpa():
        k, v = _dense_values(case)  # dequantize every page (the work a non-fused baseline does each step)
        return F.scaled_dot_product_attention(
            q.float().unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        ).squeeze(2)

    return {
        "bf16 sdpa": (lambda: bf16_decode_attention_torch(q, kp, vp, case["bf16_tables"], case["seq_lens"]),
                      _bf16_bytes(case)),
        "fp8 sdpa": (fp8_sdpa, _fp8_bytes(case)),
        "dequant+sdpa": (dequant_sdpa, _code_bytes(case)),
        "dequant torch": (lambda: dequant_decode_attention_torch(**args, pages_per_chunk=64), _code_bytes(case)),
        "hack torch": (lambda: paged_decode_attention_torch(**args, pages_per_chunk=64), _code_bytes(case)),
    }  # fmt: skip
