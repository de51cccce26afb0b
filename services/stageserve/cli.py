"""The ``stageserve`` command line: generate | eval ppl | bench offline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA_DIR = Path("../shared/data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stageserve", description="Staged LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_kv_report(sub)
    from stageserve.tools.compress_zeroc import add_parser as add_compress_parser

    add_compress_parser(sub)
    from stageserve.tools.sp_prefill import add_parser as add_sp_prefill_parser

    add_sp_prefill_parser(sub)
    from stageserve.serving.supervisor import add_up_parser

    add_up_parser(sub)
    from stageserve_operator.cli import add_operator_parser

    add_operator_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"stageserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


# ---- generate -------------------------------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text in-process and stream it to the terminal")
    p.add_argument("prompt")
    _model_args(p)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from stageserve.engine import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    llm = LLM(model=args.model, dtype=args.dtype)
    use_chat = not args.raw and getattr(llm.tokenizer, "chat_template", None)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if use_chat else args.prompt
    reason = None
    for event in llm.stream(prompt, params):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        reason = event.finish_reason
    sys.stdout.write("\n")
    print(f"[finish_reason={reason}]", file=sys.stderr)
    return 0


# ---- eval -----------------------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy evaluation")
    evsub = p.add_subparsers(dest="eval_command", required=True)
    ppl = evsub.add_parser("ppl", help="perplexity over non-overlapping windows of a text corpus")
    _model_args(ppl)
    ppl.add_argument("--data", default=str(DATA_DIR / "wikitext2" / "test.txt"))
    ppl.add_argument("--tokens", type=int, default=8192)
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument(
        "--reference", action="store_true", help="also compute transformers' perplexity on the same windows"
    )
    ppl.add_argument(
        "--kv-format",
        default=None,
        help="score every token by a decode step over a cache in this format (bf16, fp8, kivi2, hack2, hack4, "
        "hack-k4v2, hack2r, hack4r, hack-k4v2r); default: one forward pass per window in the model dtype",
    )
    ppl.add_argument("--partition", type=int, default=64, help="tokens per quantized page (32, 64, 128)")
    ppl.add_argument(
        "--kv-store", choices=("codes", "dense"), default=None, help="closed pages as packed codes or dequantized"
    )
    ppl.add_argument(
        "--split",
        choices=["all", "calib", "eval"],
        default=None,
        help="which half of --data: calib = first, eval = second (default: eval for a ZeroC model, else all)",
    )
    ppl.set_defaults(func=_eval_ppl)
    from stageserve.tools.eval_frontier import add_frontier_parser

    add_frontier_parser(evsub, str(DATA_DIR / "wikitext2" / "test.txt"))
    from stageserve.tools.eval_fairness import add_eval_fairness_parser

    add_eval_fairness_parser(evsub)


def _full_dims(llm: object) -> list[tuple[int, int]]:
    mc = llm.engine.model_config  # type: ignore[attr-defined]
    return [(mc.head_dim, mc.head_dim)] * mc.num_hidden_layers


def _eval_ppl(args: argparse.Namespace) -> int:
    from stageserve.engine import LLM
    from stageserve.tools.eval_ppl import corpus_split_tokens, perplexity, perplexity_by_decode_steps

    if args.kv_format:
        blocks = -(-args.tokens // 16) + 64
        llm = LLM(
            model=args.model,
            dtype=args.dtype,
            kv_format=args.kv_format,
            kv_page_size=args.partition,
            num_kv_blocks=blocks,
            **({"kv_store": args.kv_store} if args.kv_store else {}),
        )
    else:
        llm = LLM(model=args.model, dtype=args.dtype)
    split = args.split or ("eval" if llm.engine.loaded.model.kv_head_dims() != _full_dims(llm) else "all")
    ids = corpus_split_tokens(llm.tokenizer, args.data, split, args.tokens)
    if args.kv_format:
        result = perplexity_by_decode_steps(llm.engine, ids, args.window)
    else:
        result = perplexity(llm.engine.score, ids, args.window, progress=True)
    report = {
        "kv_format": args.kv_format or "model dtype",
        "partition": args.partition if args.kv_format else None,
        "model": llm.engine.model_config.name,
        "dtype": args.dtype,
        "stageserve_ppl": round(result.perplexity, 4),
        "tokens": args.tokens,
        "window": args.window,
        "windows": result.num_windows,
        "split": split,
        "kv_values_per_token": sum(dk + dv for dk, dv in llm.engine.loaded.model.kv_head_dims())
        * llm.engine.model_config.num_key_value_heads,
    }
    if args.reference:
        import torch

        from stageserve.tools.reference import load_transformers_model

        hf = load_transformers_model(args.model, llm.engine.config.torch_dtype)

        def hf_score(chunk: list[int]) -> torch.Tensor:
            with torch.inference_mode():
                ids_t = torch.tensor([chunk])
                logp = torch.log_softmax(hf(ids_t).logits[0, :-1].float(), dim=-1)
                return logp.gather(1, ids_t[0, 1:].unsqueeze(1)).squeeze(1)

        ref = perplexity(hf_score, ids, args.window, progress=True)
        report["transformers_ppl"] = round(ref.perplexity, 4)
        report["relative_diff"] = abs(result.perplexity - ref.perplexity) / ref.perplexity
    print(json.dumps(report, indent=2))
    return 0


# ---- bench ----------------------------------------------------------------------------------------
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    off = bsub.add_parser("offline", help="offline throughput vs transformers generate, same requests")
    _model_args(off)
    off.add_argument("--data", default=str(DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"))
    off.add_argument("--corpus", default=str(DATA_DIR / "wikitext2" / "test.txt"))
    off.add_argument("--num-requests", type=int, default=16)
    off.add_argument("--batch", type=int, default=8, help="requests in flight for the batched runs")
    off.add_argument("--scale", type=float, default=0.25, help="multiplies trace prompt and output lengths")
    off.add_argument("--max-context", type=int, default=2048)
    off.add_argument("--max-output", type=int, default=128)
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    off.add_argument("--json", default=None, help="also write the results to this file")
    off.set_defaults(func=_bench_offline)
    from stageserve.tools.bench_serve import add_bench_serve_parser

    add_bench_serve_parser(bsub)
    from stageserve_kernels.bench.decode_bench import add_bench_kernels_parser

    add_bench_kernels_parser(bsub)
    from stageserve.tools.bench_throttler import add_bench_throttler_parser

    add_bench_throttler_parser(bsub)
    from stageserve.tools.bench_encoder import add_bench_encoder_parser

    add_bench_encoder_parser(bsub)
    from stageserve.tools.bench_chaos import add_bench_chaos_parser
    from stageserve.tools.bench_fuzz import add_bench_fuzz_parser

    add_bench_chaos_parser(bsub)  # soak under process deaths (serving/gateway/migration.py)
    add_bench_fuzz_parser(bsub)  # hostile inputs to every gRPC method and the HTTP API


def _bench_offline(args: argparse.Namespace) -> int:
    import torch

    from stageserve.engine import LLM
    from stageserve.tools.bench_offline import bench, sample_requests
    from stageserve.tools.eval_ppl import corpus_tokens
    from stageserve.tools.reference import load_transformers_model

    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.batch)
    context = min(args.max_context, llm.engine.model_config.max_position_embeddings)
    corpus = corpus_tokens(llm.tokenizer, args.corpus, 65536)
    requests = sample_requests(args.data, corpus, args.num_requests, args.scale, context, args.max_output, args.seed)
    hf = None if args.no_transformers else load_transformers_model(args.model, llm.engine.config.torch_dtype)
    results = bench(llm, hf, requests, args.batch)
    rows = [r.row() for r in results]
    print(f"torch threads: {torch.get_num_threads()}  requests: {len(requests)}  dtype: {args.dtype}")
    line = "{:<14}{:<10}{:>11}{:>11}{:>9}{:>11}{:>14}"
    print(line.format("system", "mode", "prompt tok", "output tok", "seconds", "out tok/s", "prompt tok/s"))
    for r in rows:
        print(
            line.format(
                r["system"],
                r["mode"],
                r["prompt_tokens"],
                r["output_tokens"],
                f"{r['seconds']:.2f}",
                r["output_tok_s"],
                r["prompt_tok_s"],
            )
        )
    by = {(r.system, r.mode): r for r in results}
    for mode in sorted({r.mode for r in results}):
        if ("transformers", mode) in by:
            ratio = by[("stageserve", mode)].output_tps / by[("transformers", mode)].output_tps
            print(f"speedup {mode}: {ratio:.2f}x (stageserve / transformers output tok/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


# ---- kv-report ------------------------------------------------------------------------------------
SHAPES = {"llama-3.1-8b": (32, 8, 128), "llama-3.1-70b": (80, 8, 128)}


def _add_kv_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv-report", help="KV bytes per token and ratio to BF16, per format and prompt length")
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a known model shape instead of --model")
    p.add_argument("--format", default="hack2", help="bf16 | fp8 | kivi2 | hack2 | hack4 | hack-k4v2 | *r | all")
    p.add_argument("--page-size", type=int, default=64)
    p.set_defaults(func=_kv_report)


def _kv_report(args: argparse.Namespace) -> int:
    from stageserve.kvcodec.format import FORMATS
    from stageserve.kvcodec.report import format_report, kv_report

    if args.shape:
        layers, kv_heads, head_dim = SHAPES[args.shape]
        name = args.shape
    else:
        from stageserve.models.loader import read_model_config

        cfg = read_model_config(args.model)
        layers, kv_heads, head_dim, name = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.name
    formats = list(FORMATS) if args.format == "all" else [args.format]
    print(f"model: {name}  layers={layers} kv_heads={kv_heads} head_dim={head_dim} page={args.page_size}")
    for fmt in formats:
        print(format_report(kv_report(fmt, layers, kv_heads, head_dim, page_size=args.page_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
