"""Optional mutual TLS between stages, and the rule that nothing listens beyond loopback unauthenticated.

``tls: {enabled: true, cert_file, key_file, ca_file}`` (PEM files, e.g. a mounted Kubernetes Secret) makes
every stage serve gRPC over TLS and *require* a client certificate signed by ``ca_file``, and every
stage-to-stage channel present ``cert_file``/``key_file`` and verify the peer against ``ca_file``. One
process-wide setting (``configure``), read by ``GrpcStage`` (server ports) and ``stage_channel`` (clients).

``check_bind``: a stage whose host is not loopback refuses to start unless its links are authenticated
(internal stages: mTLS; the gateway: API keys) or ``allow_unauthenticated_remote: true`` says so explicitly.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from stageserve.serving.common.config import ConfigError, StageServeConfig, TlsConfig

_ACTIVE: TlsConfig | None = None
log = logging.getLogger("stageserve.tls")


def configure(cfg: TlsConfig) -> None:
    """Sets this process's TLS settings (once, at startup); validates that the files exist."""
    global _ACTIVE
    if cfg.enabled:
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(cfg, name)
            if not path or not Path(path).is_file():
                raise ConfigError(f"tls.{name}: file not found: {path!r}")
    _ACTIVE = cfg if cfg.enabled else None


def _read(cfg: TlsConfig) -> tuple[bytes, bytes, bytes]:
    return Path(cfg.cert_file).read_bytes(), Path(cfg.key_file).read_bytes(), Path(cfg.ca_file).read_bytes()


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    cert, key, ca = _read(cfg)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    cert, key, ca = _read(cfg)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def add_port(server: Any, address: str) -> int:
    """Binds ``address`` on a grpc(.aio) server: TLS with client auth when configured, else plaintext."""
    if _ACTIVE is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, server_credentials(_ACTIVE)))


def _name_options(cfg: TlsConfig, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``tls.server_name``: check the peer's certificate against it (stages dial pod IPs found by DNS)."""
    extra = [("grpc.ssl_target_name_override", cfg.server_name)] if cfg.server_name else []
    return [*options, *extra]


def aio_channel(address: str, options: Sequence[tuple[str, Any]], interceptors: Any = None) -> grpc.aio.Channel:
    if _ACTIVE is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, channel_credentials(_ACTIVE), options=_name_options(_ACTIVE, options), interceptors=interceptors
    )


def sync_channel(address: str, cfg: TlsConfig, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel (supervisor health checks, tools) honouring ``cfg``."""
    if not cfg.enabled:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(cfg), options=_name_options(cfg, options))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: StageServeConfig, stage: str) -> None:
    """Raises ConfigError when ``stage`` would listen beyond loopback without authentication.

    Inside a Kubernetes pod (the operator renders ``host: 0.0.0.0``) the refusal is a logged warning: the pod
    network is the boundary there until the operator sets ``tls``/``gateway.api_keys`` explicitly."""
    if is_loopback(config.host) or config.allow_unauthenticated_remote:
        return
    try:
        _refuse_unauthenticated(config, stage)
    except ConfigError as exc:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise
        log.warning("%s (allowed inside Kubernetes; set it explicitly)", exc)


def _refuse_unauthenticated(config: StageServeConfig, stage: str) -> None:
    if stage == "gateway":
        if not config.gateway.api_keys:
            raise ConfigError(
                f"host: the gateway would listen on {config.host} without API keys; set gateway.api_keys or "
                "allow_unauthenticated_remote: true"
            )
        if config.tls.enabled:
            return
    if not config.tls.enabled:
        raise ConfigError(
            f"host: {stage} would listen on {config.host} without mTLS; set tls.enabled (with cert_file, key_file, "
            "ca_file) or allow_unauthenticated_remote: true"
        )
