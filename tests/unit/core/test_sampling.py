"""SamplingParams: defaults, normalisation, and per-field validation errors."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from stageserve.core.sampling import InvalidRequestError, SamplingParams


def test_defaults_are_valid() -> None:
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 0.0
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.seed is None
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.min_tokens == 0
    assert params.greedy is True
    params.validate()  # idempotent


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_invalid_field_is_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)  # callers catching ValueError still see it


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"temperature": 100.0},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 50},
        {"max_tokens": 4, "min_tokens": 4},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict[str, Any]) -> None:
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(params, name) == value


def test_str_stop_becomes_one_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)  # type: ignore[arg-type]
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]


def test_stop_token_ids_normalised_to_int_tuple() -> None:
    params = SamplingParams(stop_token_ids=[2, "7"])  # type: ignore[arg-type]
    assert params.stop_token_ids == (2, 7)


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy is True
    assert SamplingParams(temperature=0.7).greedy is False
    assert SamplingParams(temperature=1e-9).greedy is False


def test_frozen_and_replace_revalidates() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 3  # type: ignore[misc]
    with pytest.raises(InvalidRequestError) as info:
        dataclasses.replace(params, top_p=0.0)
    assert info.value.field == "top_p"
