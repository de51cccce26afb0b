"""The one configuration file: a YAML document with a section per stage, parsed once into frozen dataclasses.

Every field has a default, so an empty file (or none) runs the whole pipeline on 127.0.0.1 with the embedded
model. Helm values and CLI flags map onto the same fields.

```yaml
model: null            # HF directory or .gguf; null = embedded SmolLM2-135M-Instruct
host: 127.0.0.1
kv_format: auto        # auto | bf16 | fp8 | hack4 | hack-k4v2 | hack2 | kivi2  (auto: negotiated, see kv_format.py)
gateway:   {http_port: 8000, grpc_port: 50051}
throttler: {port: 50052, metrics_port: 9102, policy: fairserve}
encoder:   {port: 50053, metrics_port: 9103, replicas: 1}
prefill:   {port: 50054, metrics_port: 9104, replicas: 1, dtype: float32}
decode:    {port: 50055, metrics_port: 9105, replicas: 1, dtype: float32}
```
Replica i of a stage listens on ``port + 10*i`` (metrics on ``metrics_port + 10*i``). The gateway finds the
throttler/encoder/prefill/decode replicas there unless a stage sets ``endpoints: [host:port, ...]`` or
``discovery: dns`` + ``service: <headless Service DNS name>`` (Kubernetes; see serving/common/discovery.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("gateway", "throttler", "encoder", "prefill", "decode")
KV_FORMATS = ("auto", "bf16", "fp8", "hack4", "hack-k4v2", "hack2", "kivi2")
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
    max_migrations: int = 3  # re-dispatches per request after a prefill/decode failure (token replay)
    migration_wait_s: float = 30.0  # how long a migrating request waits for a healthy replica
    migration_exact_max_tokens: int = 1024  # greedy/seeded: re-run and skip sent tokens (exact) up to this many
    throttler_failure_mode: str = "fail-open"  # fail-open (local per-tenant limit) | fail-closed (503)
    local_tenant_max_inflight: int = 16  # fail-open: concurrent requests per tenant while the throttler is down
    max_prompt_tokens: int = 0  # per-request prompt cap (0 = the model's context); over it -> 400
    max_output_tokens: int = 0  # per-request max_tokens cap (0 = the model's context); over it -> 400
    api_keys: dict = field(default_factory=dict)  # sha256(key) hex -> {user, app?}; set = keys required
    report_loads: bool = True  # forward the replica loads it polls to the throttler (overload detection)
    allow_remote_images: bool = False  # fetch http(s) image_url parts (else 400); data: URLs always work
    remote_image_timeout_s: float = 5.0
    image_routing: str = "least-pending"  # least-pending (image tokens) | round-robin
    discovery_interval_s: float = 5.0  # re-resolve `discovery: dns` stages at most this often (common/discovery.py)

    def __post_init__(self) -> None:
        if self.max_migrations < 0:
            raise ConfigError("gateway.max_migrations: must be >= 0")
        if self.throttler_failure_mode not in ("fail-open", "fail-closed"):
            raise ConfigError("gateway.throttler_failure_mode: must be fail-open or fail-closed")


@dataclass(frozen=True)
class ThrottlerConfig:
    port: int = 50052
    metrics_port: int = 9102
    policy: str = "fairserve"  # always-admit | fcfs | rpm | vtc | fairserve (OIT admission + WSC order)
    state: str = "embedded"  # embedded | redis (replicas share counters, windows and loads)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "stageserve:throttler"
    max_running_calls: int = 64  # calls in the engines at once; more are queued (0 = unlimited)
    max_running_tokens: int = 0  # reserved prompt + max_tokens in the engines at once (0 = unlimited)
    batch_token_budget: int = 0  # overload unit; 0 = prefill.max_num_batched_tokens x prefill replicas
    kv_enter: float = 0.90  # overload enters at this KV usage (or queue_enter x budget queued prefill tokens)
    kv_leave: float = 0.80  # ... and leaves below kv_leave and queue_leave x budget
    queue_enter: float = 2.0
    queue_leave: float = 1.0
    load_ttl_s: float = 3.0  # load reports older than this are ignored
    running_idle_s: float = 600.0  # a running call with no token report for this long is released (lost Release)
    limits: dict = field(default_factory=dict)  # app -> {user_per_min, app_per_min, max_calls_per_interaction}
    default_user_per_min: float = 0.0  # OIT limits of apps not in `limits` (0 = unlimited)
    default_app_per_min: float = 0.0
    rpm_user: int = 60  # rpm policy: calls per user per minute (0 = unlimited)
    rpm_app: int = 0
    w_in: float = 1.0
    w_sys: float = 1.0
    w_out: float = 2.0
    weights: dict = field(default_factory=dict)  # user -> weight (vtc, fairserve)
    endpoints: list = field(default_factory=list)  # explicit host:port replicas (static setups; overrides host/port)
    discovery: str = "static"  # static (host, port + 10*i / endpoints) | dns (every IP of `service`, on `port`)
    service: str = ""  # discovery: dns -> a headless Service's DNS name, e.g. llm-prefill.default.svc

    def __post_init__(self) -> None:
        if self.policy not in ("always-admit", "fcfs", "rpm", "vtc", "fairserve"):
            raise ConfigError(
                f"throttler.policy: must be one of always-admit, fcfs, rpm, vtc, fairserve, got {self.policy!r}"
            )
        if self.state not in ("embedded", "redis"):
            raise ConfigError(f"throttler.state: must be embedded or redis, got {self.state!r}")


@dataclass(frozen=True)
class EncoderConfig:
    """Image encoding. The vision_* fields shape the seeded (untrained) tower used when the model is not an
    HF LLaVA directory; the gateway reads the same fields for its image-token estimate."""

    port: int = 50053
    metrics_port: int = 9103
    replicas: int = 1
    vision_image_size: int = 64  # pixels per tile side
    vision_patch_size: int = 8
    vision_hidden_size: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vision_seed: int = 0
    max_grid: int = 2  # tiles per side for images larger than one tile (plus one thumbnail tile)
    max_images_per_request: int = 16
    max_image_bytes: int = 8 << 20
    max_image_side: int = 4096
    max_batch_tiles: int = 32  # tiles per vision forward pass
    embedding_ttl_s: float = 120.0  # encoded embeddings nobody fetched are dropped after this
    endpoints: list = field(default_factory=list)  # explicit host:port replicas (static setups; overrides host/port)
    discovery: str = "static"  # static (host, port + 10*i / endpoints) | dns (every IP of `service`, on `port`)
    service: str = ""  # discovery: dns -> a headless Service's DNS name, e.g. llm-prefill.default.svc


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
    endpoints: list = field(default_factory=list)  # explicit host:port replicas (static setups; overrides host/port)
    discovery: str = "static"  # static (host, port + 10*i / endpoints) | dns (every IP of `service`, on `port`)
    service: str = ""  # discovery: dns -> a headless Service's DNS name, e.g. llm-prefill.default.svc


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS between stages (serving/common/tls.py): PEM files, e.g. from a mounted Secret."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    server_name: str = ""  # name peers' certificates are checked against (not the dialled IP), e.g. in k8s


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
    tls: TlsConfig = field(default_factory=TlsConfig)
    allow_unauthenticated_remote: bool = False  # listen beyond loopback without mTLS/API keys (explicit)

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise ConfigError(f"kv_format: must be one of {', '.join(KV_FORMATS)}, got {self.kv_format!r}")
        for stage in ("encoder", "prefill", "decode"):
            if getattr(self, stage).replicas < 1:
                raise ConfigError(f"{stage}.replicas: must be >= 1")
        for stage in ("throttler", "encoder", "prefill", "decode"):
            _check_discovery(stage, getattr(self, stage))

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


def _check_discovery(stage: str, cfg: Any) -> None:
    if cfg.discovery not in ("static", "dns"):
        raise ConfigError(f"{stage}.discovery: must be static or dns, got {cfg.discovery!r}")
    if cfg.discovery == "dns" and not cfg.service:
        raise ConfigError(f"{stage}.service: required with discovery: dns (a headless Service's DNS name)")
    for i, endpoint in enumerate(cfg.endpoints):
        host, sep, port = str(endpoint).rpartition(":")
        if not (isinstance(endpoint, str) and sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{stage}.endpoints[{i}]: expected host:port, got {endpoint!r}")


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
