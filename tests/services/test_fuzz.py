"""Fuzzing (CI-sized sample): hypothesis-generated hostile requests to every gRPC method of every stage and to
the OpenAI HTTP API of the real pipeline. 0 INTERNAL/UNKNOWN, 0 5xx, every rejection names its problem, and
every stage still answers health checks afterwards. ``stageserve bench fuzz --n 10000`` runs the full count."""

from __future__ import annotations

import grpc

from stageserve.tools.bench_fuzz import METHODS, Report, call, fuzz_grpc, fuzz_http, healthy


def _addresses(pipeline) -> dict[str, str]:
    addresses = {stage: replicas[0] for stage, replicas in pipeline.stages.items()}
    addresses["gateway"] = pipeline.gateway_grpc
    return addresses


def test_grpc_methods_survive_hostile_inputs(pipeline):
    report = Report()
    fuzz_grpc(_addresses(pipeline), 18, report)
    assert report.inputs >= 18 * len(METHODS) * 0.9
    assert report.findings == []
    assert report.codes["INVALID_ARGUMENT"] > 0  # the sample did reach the validation paths
    assert healthy(_addresses(pipeline)) == []


def test_http_api_survives_hostile_bodies(pipeline):
    report = Report()
    fuzz_http(pipeline.gateway_http, 120, report)
    assert report.findings == []
    assert report.codes["HTTP 400"] > 0
    assert healthy(_addresses(pipeline)) == []


def test_malformed_protobuf_is_invalid_argument_naming_the_message(pipeline):
    with grpc.insecure_channel(pipeline.stages["decode"][0], options=[("grpc.enable_http_proxy", 0)]) as channel:
        method = next(m for m in METHODS if m.path.endswith("Decode/Generate"))
        code, details = call(channel, method, b"\x0a\x05ab")  # field 1 (request_id) says 5 bytes, has 2
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed DecodeRequest" in details


def test_invalid_utf8_string_is_invalid_argument(pipeline):
    with grpc.insecure_channel(pipeline.stages["prefill"][0], options=[("grpc.enable_http_proxy", 0)]) as channel:
        method = next(m for m in METHODS if m.path.endswith("Prefill/Prefill"))
        code, details = call(channel, method, b"\x0a\x02\xff\xfe")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "PrefillRequest" in details
