"""``stageserve bench fuzz``: hypothesis-generated requests against every gRPC method of every stage.

Each input is a protobuf request built field by field from the method's descriptor (huge, negative and edge
numbers, unknown enum values, empty and oversize strings and bytes, long repeated fields, nested messages),
then optionally damaged on the wire: truncated, a byte flipped, or a string field re-sent as invalid UTF-8.
A method passes an input when the stage answers OK or with a status from the error table whose details name
the problem; INTERNAL, UNKNOWN, an empty error message, or a stage that stops answering is a finding.
The HTTP API gets hypothesis-generated JSON bodies the same way: any 5xx, or a 4xx without a message, is a
finding. The stages must answer health checks afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stageserve.v1 import (
    common_pb2,
    decode_pb2,
    encoder_pb2,
    gateway_pb2,
    kvpage_pb2,
    prefill_pb2,
    throttler_pb2,
)

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
TIMEOUT_S = 0.5
_INTS = [0, 1, -1, 2, 7, 255, 1 << 15, (1 << 31) - 1, -(1 << 31), (1 << 32) - 1, (1 << 63) - 1, -(1 << 63)]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e30, -1e30, float("inf"), float("-inf"), float("nan"), 1e-40]
_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


@dataclass(frozen=True)
class Method:
    stage: str
    path: str  # /package.Service/Method
    request: Any  # message class
    kind: str  # unary | server_stream | client_stream


METHODS = [
    Method("gateway", "/stageserve.v1.Gateway/Generate", gateway_pb2.GenerateRequest, "server_stream"),
    Method("gateway", "/stageserve.v1.Gateway/ListModels", gateway_pb2.ListModelsRequest, "unary"),
    Method("throttler", "/stageserve.v1.Throttler/Admit", throttler_pb2.AdmitRequest, "unary"),
    Method("throttler", "/stageserve.v1.Throttler/AwaitAdmission", throttler_pb2.AwaitRequest, "unary"),
    Method("throttler", "/stageserve.v1.Throttler/ReportTokens", throttler_pb2.TokenReport, "unary"),
    Method("throttler", "/stageserve.v1.Throttler/Release", throttler_pb2.ReleaseRequest, "unary"),
    Method("encoder", "/stageserve.v1.Encoder/Encode", encoder_pb2.EncodeRequest, "unary"),
    Method("encoder", "/stageserve.v1.Encoder/FetchEmbeddings", encoder_pb2.FetchEmbeddingsRequest, "server_stream"),
    Method("prefill", "/stageserve.v1.Prefill/Prefill", prefill_pb2.PrefillRequest, "unary"),
    Method("decode", "/stageserve.v1.Decode/Generate", decode_pb2.DecodeRequest, "server_stream"),
    Method("decode", "/stageserve.v1.Decode/PushKV", kvpage_pb2.KVFrame, "client_stream"),
]
for _stage in ("prefill", "decode", "encoder"):
    _service = _stage.capitalize()
    METHODS.append(Method(_stage, f"/stageserve.v1.{_service}/GetLoad", common_pb2.LoadRequest, "unary"))


# ---- inputs ------------------------------------------------------------------------------------------
def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t in _RANGES:
        lo, hi = _RANGES[t]
        return st.one_of(st.sampled_from([v for v in _INTS if lo <= v <= hi]), st.integers(lo, hi), st.integers(0, 600))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(st.sampled_from(_FLOATS), st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-3, 1000))
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.just(""), st.sampled_from(["127.0.0.1:1", "x" * 70000, "\x00"]))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b""), st.just(b"\x89PNG\r\n\x1a\n" + b"\0" * 100))
    raise TypeError(f"unsupported field type {t}")


def message_strategy(cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``cls`` with any subset of fields set to hostile values."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for f in cls.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            value: st.SearchStrategy[Any] = message_strategy(f.message_type._concrete_class, depth + 1)
        else:
            value = _scalar(f)
        if f.is_repeated:
            value = st.one_of(st.lists(value, max_size=6), st.lists(value, min_size=2000, max_size=2000)) if (
                f.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
            ) else st.lists(value, max_size=4)
        parts[f.name] = st.one_of(st.none(), value)

    def build(values: dict[str, Any]) -> Any:
        msg = cls()
        for name, v in values.items():
            if v is None:
                continue
            f = cls.DESCRIPTOR.fields_by_name[name]
            try:
                if f.is_repeated:
                    target = getattr(msg, name)
                    for item in v:
                        target.add().CopyFrom(item) if f.type == FieldDescriptor.TYPE_MESSAGE else target.append(item)
                elif f.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, name).CopyFrom(v)
                else:
                    setattr(msg, name, v)
            except (ValueError, TypeError):
                pass  # a value protobuf itself refuses cannot be sent that way
        return msg

    return st.fixed_dictionaries({}, optional=parts).map(build)


def _damage(data: bytes, how: int, rnd: random.Random, cls: Any) -> bytes:
    """0: as is; 1: truncated; 2: one byte flipped; 3: a string field re-sent as invalid UTF-8."""
    if how == 1 and data:
        return data[: rnd.randrange(len(data))]
    if how == 2 and data:
        i = rnd.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rnd.randrange(8))]) + data[i + 1 :]
    if how == 3:
        strings = [f.number for f in cls.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_STRING]
        if strings:
            bad = b"\xff\xfe\xc0\x80"
            return data + bytes([(rnd.choice(strings) << 3) | 2, len(bad)]) + bad
    return data


def inputs(method: Method) -> st.SearchStrategy[bytes]:
    def serialize(args: tuple[Any, int, int]) -> bytes:
        msg, how, seed = args
        return _damage(msg.SerializeToString(), how, random.Random(seed), method.request)

    damage = st.sampled_from([0, 0, 1, 2, 3])
    return st.tuples(message_strategy(method.request), damage, st.integers(0, 1 << 30)).map(serialize)


# ---- calls -------------------------------------------------------------------------------------------
@dataclass
class Report:
    inputs: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)

    def check(self, where: str, code: grpc.StatusCode, details: str | None) -> None:
        self.inputs += 1
        self.codes[code.name] += 1
        if code in FORBIDDEN:
            self.findings.append(f"{where}: {code.name}: {details}")
        elif code != grpc.StatusCode.OK and not (details or "").strip():
            self.findings.append(f"{where}: {code.name} without a message")


def call(channel: grpc.Channel, method: Method, payload: bytes) -> tuple[grpc.StatusCode, str | None]:
    try:
        if method.kind == "unary":
            channel.unary_unary(method.path)(payload, timeout=TIMEOUT_S)
        elif method.kind == "server_stream":
            for _ in channel.unary_stream(method.path)(payload, timeout=TIMEOUT_S):
                pass
        else:
            channel.stream_unary(method.path)(iter([payload, payload]), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, None


def fuzz_grpc(addresses: dict[str, str], n_per_method: int, report: Report, seed: int = 0) -> None:
    """``n_per_method`` hypothesis inputs to every method; ``addresses``: stage -> one replica's host:port."""
    channels = {s: grpc.insecure_channel(a, options=[("grpc.enable_http_proxy", 0)]) for s, a in addresses.items()}
    try:
        for method in METHODS:
            if method.stage not in channels:
                continue
            channel = channels[method.stage]

            @settings(max_examples=n_per_method, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=True)
            @given(inputs(method))
            def one(payload: bytes) -> None:
                code, details = call(channel, method, payload)  # noqa: B023
                report.check(method.path, code, details)  # noqa: B023

            one()
    finally:
        for channel in channels.values():
            channel.close()


# ---- HTTP ---------------------------------------------------------------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
         "stream", "seed", "logprobs", "user", "stream_options", "presence_penalty", "min_tokens", "top_k"]


def _body() -> st.SearchStrategy[dict[str, Any]]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus", ""]) | _JSON},
        optional={"content": st.text(max_size=40) | _JSON},
    )
    known = {
        "messages": st.lists(message, max_size=3) | _JSON,
        "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 1 << 20), max_size=5) | _JSON,
        "max_tokens": st.integers(-5, 5) | st.sampled_from([0, 1 << 31, 10**12]) | _JSON,
        "model": st.text(max_size=10) | _JSON,
        "stream": st.booleans() | _JSON,
    }
    return st.fixed_dictionaries({}, optional={k: known.get(k, _JSON) for k in _KEYS})


def fuzz_http(base_url: str, n: int, report: Report) -> None:
    with httpx.Client(base_url=base_url, timeout=10.0, trust_env=False) as client:

        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), _body(), st.integers(0, 3))
        def one(path: str, body: dict[str, Any], raw: int) -> None:
            if body.get("max_tokens") is None or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 4:
                body = {**body, "max_tokens": 2} if raw else body  # keep most valid requests short
            content = json.dumps(body, allow_nan=True).encode()
            if raw == 3:
                content = content[: len(content) // 2] + b"\xff"  # broken JSON, invalid UTF-8
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            report.inputs += 1
            report.codes[f"HTTP {r.status_code}"] += 1
            if r.status_code >= 500:
                report.findings.append(f"POST {path} {content[:200]!r}: HTTP {r.status_code}: {r.text[:200]}")
            elif r.status_code >= 400 and not _error_message(r):
                report.findings.append(f"POST {path}: HTTP {r.status_code} without an error message")

        one()


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


def healthy(addresses: dict[str, str]) -> list[str]:
    """Stages that no longer answer a health check."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    dead = []
    for stage, address in addresses.items():
        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    dead.append(stage)
            except grpc.RpcError:
                dead.append(stage)
    return dead


# ---- CLI ----------------------------------------------------------------------------------------------
def add_bench_fuzz_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fuzz", help="fuzz every gRPC method and the HTTP API of a fresh local pipeline")
    p.add_argument("--n", type=int, default=10000, help="total inputs (split over the gRPC methods and HTTP)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stageserve.serving.supervisor import Supervisor, free_port_config

    config = free_port_config(prefill={"kv_cache_memory_bytes": 128 << 20}, decode={"kv_cache_memory_bytes": 128 << 20})
    with Supervisor(config, startup_timeout_s=600.0) as sup:
        endpoints = sup.endpoints()
        addresses = {stage: a[0] for stage, a in endpoints.stages.items()}
        addresses["gateway"] = endpoints.gateway_grpc
        report = Report()
        share = args.n // (len(METHODS) + 2)
        started = time.perf_counter()
        fuzz_grpc(addresses, share, report)
        fuzz_http(endpoints.gateway_http, args.n - share * len(METHODS), report)
        elapsed = time.perf_counter() - started
        dead = healthy(addresses)
    print(f"inputs: {report.inputs} in {elapsed:.0f} s; findings: {len(report.findings)}; stages down after: {dead}")
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(report.codes.items())))
    for finding in report.findings[:50]:
        print("  " + finding)
    return 1 if report.findings or dead else 0
