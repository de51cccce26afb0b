"""Conversions between proto messages and the in-process types, shared by the stage shells."""

from __future__ import annotations

from stageserve.core.sampling import SamplingParams
from stageserve.engine.outputs import TokenEvent
from stageserve.v1 import common_pb2

FORMAT_NAMES = {
    common_pb2.KV_FORMAT_BF16: "bf16",
    common_pb2.KV_FORMAT_FP8: "fp8",
    common_pb2.KV_FORMAT_HACK2: "hack2",
    common_pb2.KV_FORMAT_HACK4: "hack4",
    common_pb2.KV_FORMAT_HACK_K4V2: "hack-k4v2",
    common_pb2.KV_FORMAT_KIVI2: "kivi2",
}
FORMAT_IDS = {name: value for value, name in FORMAT_NAMES.items()}


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (naming the field) for out-of-range values."""
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else 16,
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
        seed_offset=p.seed_offset,
    )


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        include_stop_str_in_output=p.include_stop_str_in_output,
        seed_offset=p.seed_offset,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def format_name(value: int) -> str:
    if value not in FORMAT_NAMES:
        raise ValueError(f"kv_format: unknown value {value}")
    return FORMAT_NAMES[value]


def token_event(
    request_id: str,
    token_ids: list[int],
    text: str,
    finish_reason: str | None,
    usage: tuple[int, int, int] | None,
) -> common_pb2.TokenEvent:
    """A TokenEvent; ``usage`` (prompt, completion, cached tokens) is set on the final event only."""
    msg = common_pb2.TokenEvent(
        request_id=request_id,
        token_ids=token_ids,
        text=text,
        finished=usage is not None,
        finish_reason=finish_reason or "",
    )
    if usage is not None:
        prompt, completion, cached = usage
        msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached))
    return msg


def event_to_proto(event: TokenEvent, completion_tokens: int) -> common_pb2.TokenEvent:
    usage = (event.num_prompt_tokens, completion_tokens, event.num_cached_tokens) if event.finished else None
    return token_event(event.request_id, event.token_ids, event.text, event.finish_reason, usage)
