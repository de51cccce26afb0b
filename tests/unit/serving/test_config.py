"""The YAML config: defaults, overrides, replica ports, clear errors naming the field."""

from __future__ import annotations

import pytest

from stageserve.serving.common.config import ConfigError, load_config


def test_defaults_follow_the_design_ports():
    cfg = load_config()
    assert cfg.gateway.http_port == 8000 and cfg.gateway.grpc_port == 50051
    assert [cfg.replica_port(s, 0) for s in ("throttler", "encoder", "prefill", "decode")] == [
        50052,
        50053,
        50054,
        50055,
    ]


def test_yaml_and_overrides_and_replica_ports(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("kv_format: fp8\nprefill: {replicas: 2, port: 6000}\n")
    cfg = load_config(str(path), {"decode": {"replicas": 3}})
    assert cfg.kv_format == "fp8"
    assert cfg.addresses("prefill") == ["127.0.0.1:6000", "127.0.0.1:6010"]
    assert len(cfg.addresses("decode")) == 3
    assert load_config(None, {"gateway": {"http_port": "9000"}}).gateway.http_port == 9000
    assert load_config(str(tmp_path / "s.yaml")).to_yaml().count("replicas") == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kv_format": "int3"}, "kv_format"),
        ({"prefill": {"replicas": 0}}, "prefill.replicas"),
        ({"decode": {"prot": 1}}, "decode.prot"),
        ({"gateway": {"http_port": "eighty"}}, "gateway.http_port"),
        ({"prefill": {"enable_prefix_caching": "yes"}}, "prefill.enable_prefix_caching"),
    ],
)
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
