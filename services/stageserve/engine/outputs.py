"""What the engine hands back: per-step token events and vLLM-style request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    """New tokens and text for one request from one engine step (a streaming delta)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
