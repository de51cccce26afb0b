"""``stageserve eval ppl`` equals transformers' perplexity on the same windows (within 0.1 %)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stageserve.tools.eval_ppl import corpus_tokens, perplexity, windows
from tests.conftest import DATA

WIKITEXT = DATA / "wikitext2" / "test.txt"


def test_windows_are_non_overlapping_and_full():
    chunks = windows(list(range(10)), 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        windows([1, 2], 4)


def test_perplexity_matches_transformers(llm, hf_model):
    ids = corpus_tokens(llm.tokenizer, str(WIKITEXT), 1024)

    def hf_score(chunk):
        with torch.inference_mode():
            t = torch.tensor([chunk])
            logp = torch.log_softmax(hf_model(t).logits[0, :-1].float(), dim=-1)
            return logp.gather(1, t[0, 1:].unsqueeze(1)).squeeze(1)

    ours = perplexity(llm.engine.score, ids, 256)
    ref = perplexity(hf_score, ids, 256)
    assert ours.num_windows == 4 and ours.num_predicted == 4 * 255
    assert 5 < ours.perplexity < 100  # a real language model on English text
    assert abs(ours.perplexity - ref.perplexity) / ref.perplexity < 1e-3


def test_eval_ppl_cli_prints_perplexity():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stageserve.cli",
            "eval",
            "ppl",
            "--data",
            str(WIKITEXT),
            "--tokens",
            "512",
            "--window",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["windows"] == 2 and 5 < report["stageserve_ppl"] < 100
