"""Perplexity over non-overlapping windows of a text corpus (``stageserve eval ppl``).

The first ``tokens`` tokens of the corpus are cut into windows of ``window`` tokens; every token of a
window but the first is scored given the tokens before it in that window. The same windows fed to
transformers give the reference figure (tests/tools/test_eval_ppl.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

ScoreFn = Callable[[list[int]], Any]  # token ids -> per-token log-probs of ids[1:] (a torch tensor)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    num_predicted: int
    num_windows: int
    window: int


def corpus_tokens(tokenizer: Any, path: str, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of a text file (tokenized without special tokens)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    ids: list[int] = []
    with file.open(encoding="utf-8") as fh:
        while len(ids) < num_tokens:
            chunk = fh.read(1 << 16)
            chunk += fh.readline()  # end chunks at line breaks so no word is split
            if not chunk:
                break
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    if len(ids) < num_tokens:
        raise ValueError(f"{path} holds only {len(ids)} tokens, fewer than the {num_tokens} asked for")
    return ids[:num_tokens]


SPLITS = ("all", "calib", "eval")


def corpus_split_tokens(tokenizer: Any, path: str, split: str, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of one half of a text file: ``calib`` = the first half of its characters,
    ``eval`` = the second half (cut at the first line break after the middle, so the halves never overlap),
    ``all`` = the whole file (``corpus_tokens``). ZeroC calibrates on ``calib`` and evaluates on ``eval``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return corpus_tokens(tokenizer, path, num_tokens)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"corpus not found: {path}")
    text = file.read_text(encoding="utf-8")
    cut = text.find("\n", len(text) // 2) + 1 or len(text)
    part = text[:cut] if split == "calib" else text[cut:]
    ids: list[int] = []
    pos = 0
    while len(ids) < num_tokens and pos < len(part):
        end = part.find("\n", pos + (1 << 16))
        end = len(part) if end < 0 else end + 1
        ids.extend(tokenizer.encode(part[pos:end], add_special_tokens=False))
        pos = end
    if len(ids) < num_tokens:
        raise ValueError(f"the {split} half of {path} holds only {len(ids)} tokens, fewer than {num_tokens}")
    return ids[:num_tokens]


def windows(ids: list[int], window: int) -> list[list[int]]:
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if len(ids) < window:
        raise ValueError(f"{len(ids)} tokens make no full window of {window}")
    return [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]


def perplexity(score: ScoreFn, ids: list[int], window: int, progress: bool = False) -> PerplexityResult:
    nll, count = 0.0, 0
    chunks = windows(ids, window)
    for chunk in tqdm(chunks, desc="ppl", unit="window", disable=not progress):
        logprobs = score(chunk)
        nll -= float(logprobs.double().sum())
        count += len(chunk) - 1
    return PerplexityResult(math.exp(nll / count), nll, count, len(chunks), window)


def perplexity_by_decode_steps(engine: Any, ids: list[int], window: int) -> PerplexityResult:
    """Perplexity where every token is scored by a decode step over the engine's (possibly quantized) paged
    cache; all windows advance together. Same windows and token set as ``perplexity``."""
    chunks = windows(ids, window)
    logprobs = engine.score_by_decode_steps(chunks, progress=True)
    nll = -sum(float(lp.double().sum()) for lp in logprobs)
    count = sum(len(c) - 1 for c in chunks)
    return PerplexityResult(math.exp(nll / count), nll, count, len(chunks), window)
