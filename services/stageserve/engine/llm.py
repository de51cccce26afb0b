"""Offline API in the style of vLLM: ``LLM(...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from stageserve.core.sampling import SamplingParams
from stageserve.engine.config import EngineConfig
from stageserve.engine.engine import LLMEngine
from stageserve.engine.outputs import CompletionOutput, RequestOutput, TokenEvent
from stageserve.models.loader import LoadedModel

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """An in-process engine. ``model=None`` loads the embedded SmolLM2-135M-Instruct.

    Extra keyword arguments are EngineConfig fields (block_size, max_num_seqs, num_kv_blocks, ...).
    """

    def __init__(
        self, model: str | None = None, dtype: str = "float32", loaded: LoadedModel | None = None, **engine_kwargs: Any
    ) -> None:
        """``loaded`` reuses weights already in memory (several engines over one model, e.g. in tests)."""
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_kwargs), loaded)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generates for every prompt with continuous batching; results come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        params = _per_prompt(sampling_params, len(prompt_list))
        return self._run([(p if isinstance(p, str) else None, self.encode(p)) for p in prompt_list], params, use_tqdm)

    def chat(
        self,
        conversations: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        params = _per_prompt(sampling_params, len(convs))
        return self._run([(None, self.apply_chat_template(c)) for c in convs], params, use_tqdm)  # type: ignore[arg-type]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yields the request's token events as they are generated."""
        engine = self.engine
        rid = engine.new_request_id()
        engine.add_request(rid, self.encode(prompt), sampling_params or SamplingParams())
        try:
            while True:
                for event in engine.step():
                    if event.request_id == rid:
                        yield event
                        if event.finished:
                            return
        finally:
            engine.abort_request(rid)

    def _run(
        self, prompts: list[tuple[str | None, list[int]]], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for (text, ids), p in zip(prompts, params, strict=True):
            rid = engine.new_request_id()
            engine.add_request(rid, ids, p)
            order.append(rid)
            results[rid] = RequestOutput(
                rid, text, ids, [CompletionOutput(0, "", [])], metrics={"arrival": time.monotonic()}
            )
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        try:
            while any(not results[r].finished for r in order):
                for event in engine.step():
                    out = results.get(event.request_id)
                    if out is None:
                        continue
                    completion = out.outputs[0]
                    completion.token_ids.extend(event.token_ids)
                    completion.text += event.text
                    if event.token_ids and "first_token" not in out.metrics:
                        out.metrics["first_token"] = time.monotonic()
                    if event.finished:
                        completion.finish_reason = event.finish_reason
                        out.finished = True
                        out.num_cached_tokens = event.num_cached_tokens
                        out.metrics["finished"] = time.monotonic()
                        bar.update(1)
        finally:
            bar.close()
            for rid in order:
                if not results[rid].finished:
                    engine.abort_request(rid)
        return [results[r] for r in order]


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)
