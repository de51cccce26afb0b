"""Shared fixtures: the default model loaded once per session, by us and by transformers (the reference)."""

from __future__ import annotations

import pytest

DATA = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data"

PROMPTS = [
    "Hi",
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
    "In the beginning of the twentieth century, the small town by the river was known for its mills, "
    "its bridges and a market that drew farmers from every valley around. One autumn morning",
    "Write a short story about a robot learning to paint. " * 12,
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def loaded():
    from stageserve.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def make_llm(loaded):
    """Builds an LLM over the already-loaded default weights with the given engine settings."""
    from stageserve.engine import LLM

    def make(**kwargs):
        return LLM(loaded=loaded, **kwargs)

    return make


@pytest.fixture(scope="session")
def llm(make_llm):
    return make_llm(num_kv_blocks=512)


@pytest.fixture(scope="session")
def hf_model():
    from stageserve.tools.reference import load_transformers_model

    return load_transformers_model()
