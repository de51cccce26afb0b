"""The one configuration file: a YAML document with a section per stage, parsed once into frozen dataclasses.

Every field has a default, so an empty file (or none) runs the whole pipeline on 127.0.0.1 with the embedded
model. Helm values and CLI flags map onto the same fields.

```yaml
model: null            # HF directory or .gguf; null = embedded SmolLM2-135M-Instruct
host: 127.0.0.1
kv_format: auto        # auto | bf16 | fp8  (auto: negotiated from capabilities and link bandwidth)
gateway:   {http_port: 8000, grpc_port: 50051}
throttler: {port: 50052, metrics_port: 9102, policy: always-admit}
encoder:   {port: 50053, metrics_port: 9103, replicas: 1}
prefill:   {port: 50054, metrics_port: 9104, replicas: 1, dtype: float32}
decode:    {port: 50055, metrics_port: 9105, replicas: 1, dtype: float32}
```
Replica i of a stage listens on ``port + 10*i`` (metrics on ``metrics_port + 10*i``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("gateway", "throttler", "encoder", "prefill", "decode")
KV_FORMATS = ("auto", "bf16", "fp8")
REPLICA_PORT_STRIDE = 10


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


@dataclass(frozen=True)
class GatewayConfig:
    http_port: int = 8000
    grpc_port: int = 50051
    load_poll_interval_s: float = 0.5  # how often replica load reports are refreshed
    max_prompt_bytes: int = 4 << 20
    request_timeout_s: float = 600.0
    link_gbps: float = 10.0  # assumed prefill->decode link bandwidth for format negotiation


@dataclass(frozen=True)
class ThrottlerConfig:
    port: int = 50052
    metrics_port: int = 9102
    policy: str = "always-admit"


@dataclass(frozen=True)
class EncoderConfig:
    port: int = 50053
    metrics_port: int = 9103
    replicas: int = 1


@dataclass(frozen=True)
class EngineStageConfig:
    """Prefill or decode: the engine settings of each replica."""

    port: int = 50054
    metrics_port: int = 9104
    replicas: int = 1
    dtype: str = "float32"
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    link_rate_gbps: float = 0.0  # prefill only: emulate a slower link to decode (0 = no limit)
    stream_kv_layerwise: bool = True  # prefill only: send each page as produced (False: after the forward pass)


@dataclass(frozen=True)
class StageServeConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    kv_format: str = "auto"
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    throttler: ThrottlerConfig = field(default_factory=ThrottlerConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prefill: EngineStageConfig = field(default_factory=EngineStageConfig)
    decode: EngineStageConfig = field(default_factory=lambda: EngineStageConfig(port=50055, metrics_port=9105))

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise ConfigError(f"kv_format: must be one of {', '.join(KV_FORMATS)}, got {self.kv_format!r}")
        for stage in ("encoder", "prefill", "decode"):
            if getattr(self, stage).replicas < 1:
                raise ConfigError(f"{stage}.replicas: must be >= 1")

    def replica_port(self, stage: str, index: int) -> int:
        base = self.gateway.grpc_port if stage == "gateway" else getattr(self, stage).port
        return base + REPLICA_PORT_STRIDE * index

    def replica_address(self, stage: str, index: int) -> str:
        return f"{self.host}:{self.replica_port(stage, index)}"

    def addresses(self, stage: str) -> list[str]:
        replicas = getattr(getattr(self, stage), "replicas", 1)
        return [self.replica_address(stage, i) for i in range(replicas)]

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> StageServeConfig:
    """Reads the YAML file (if any), applies ``overrides`` (nested dicts) and validates every field."""
    raw: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(file.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return _build(StageServeConfig, raw, "")


def _build(cls: Any, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{sorted(unknown)[0]}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in raw.items():
        current = getattr(defaults, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: must be a mapping")
            merged = {**dataclasses.asdict(current), **value}
            kwargs[name] = _build(type(current), merged, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, current, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            raise TypeError
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {type(default).__name__}, got {value!r}") from None
