"""Security: mutual TLS between stages (certificates made here with the openssl CLI), the loopback-only bind
rule, and no pickle/eval/exec on any input path of the source tree."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stageserve.serving.common import tls
from stageserve.serving.common.config import ConfigError, TlsConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=stageserve-test-ca", cwd=d)
    for name in ("stage", "rogue"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", "stage.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "stage.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    # a certificate from another CA: must be refused
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem",
             "-days", "2", "-subj", "/CN=rogue-ca", cwd=d)
    _openssl("x509", "-req", "-in", "rogue.csr", "-CA", "rogue-ca.pem", "-CAkey", "rogue-ca.key",
             "-CAcreateserial", "-out", "rogue.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mtls_stage_accepts_only_clients_with_a_certificate_from_the_ca(certs):
    from stageserve.serving.common.server import GrpcStage, stage_channel

    good = TlsConfig(True, str(certs / "stage.pem"), str(certs / "stage.key"), str(certs / "ca.pem"))
    rogue = TlsConfig(True, str(certs / "rogue.pem"), str(certs / "rogue.key"), str(certs / "ca.pem"))
    address = f"127.0.0.1:{_free_port()}"

    async def check(channel: grpc.aio.Channel) -> grpc.StatusCode | int:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5.0)
            return int(reply.status)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await channel.close()

    async def main():
        tls.configure(good)
        try:
            stage = GrpcStage(address, [])
            await stage.server.start()
            await stage.set_serving(True)
            ok = await check(stage_channel(address))  # the stages' own channel: presents the stage certificate
            plaintext = await check(grpc.aio.insecure_channel(address))
            no_cert = await check(grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())))
            wrong_ca = await check(grpc.aio.secure_channel(address, tls.channel_credentials(rogue)))
            await stage.server.stop(0)
            return ok, plaintext, no_cert, wrong_ca
        finally:
            tls.configure(TlsConfig())

    ok, plaintext, no_cert, wrong_ca = asyncio.run(main())
    assert ok == health_pb2.HealthCheckResponse.SERVING
    assert plaintext == no_cert == wrong_ca == grpc.StatusCode.UNAVAILABLE


def test_tls_config_names_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="tls.cert_file"):
        tls.configure(TlsConfig(True, str(tmp_path / "nope.pem"), "", ""))
    tls.configure(TlsConfig())


def test_refuses_to_listen_beyond_loopback_without_auth(monkeypatch, certs):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    remote = load_config(None, {"host": "0.0.0.0"})
    for stage in ("decode", "gateway"):
        with pytest.raises(ConfigError, match="host:"):
            tls.check_bind(remote, stage)
    tls.check_bind(load_config(None, {"host": "0.0.0.0", "allow_unauthenticated_remote": True}), "decode")
    tls.check_bind(load_config(None, {"host": "127.0.0.1"}), "gateway")
    pki = {"enabled": True, "cert_file": "a", "key_file": "b", "ca_file": "c"}
    secured = load_config(None, {"host": "10.1.2.3", "tls": pki, "gateway": {"api_keys": {"ab": {"user": "u"}}}})
    tls.check_bind(secured, "decode")
    tls.check_bind(secured, "gateway")


_FORBIDDEN = re.compile(r"\b(pickle\.loads?|cPickle|dill\.|marshal\.loads|yaml\.load\(|yaml\.unsafe_load|"
                        r"torch\.load\((?![^)]*weights_only=True)|(?<![.\w])eval\(|(?<![.\w])exec\()")


def test_no_pickle_or_eval_on_any_input_path():
    """Requests, KV pages, traces and config are parsed as protobuf/JSON/safe YAML only."""
    offenders = []
    for root in ("services", "operators", "kernels"):
        for path in (ROOT / root).rglob("*.py"):
            if "/v1/" in str(path):  # generated protobuf modules
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                code = line.split("#", 1)[0]
                if _FORBIDDEN.search(code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_whole_pipeline_over_mtls(certs):
    """Every stage serves and calls over mutual TLS (supervisor health checks included); a plaintext or
    certificate-less client is refused by the gateway's gRPC port."""
    from stageserve.serving.supervisor import Supervisor, free_port_config
    from stageserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    pki = {"enabled": True, "cert_file": str(certs / "stage.pem"), "key_file": str(certs / "stage.key"),
           "ca_file": str(certs / "ca.pem")}
    config = free_port_config(tls=pki, prefill={"kv_cache_memory_bytes": 64 << 20},
                              decode={"kv_cache_memory_bytes": 64 << 20})
    request = gateway_pb2.GenerateRequest(prompt="The capital of France is",
                                          sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
    with Supervisor(config, stages=("throttler", "decode", "prefill", "gateway"), startup_timeout_s=300.0) as sup:
        address = sup.config.replica_address("gateway", 0)
        with tls.sync_channel(address, sup.config.tls) as channel:
            events = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120))
        assert sum(len(e.token_ids) for e in events) == 4 and events[-1].finished
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_name_checks_pod_certificates_by_name_and_the_exec_probe_uses_it(certs, tmp_path):
    """Stages dial pod IPs; their certificate names a DNS SAN only (as the Helm chart's Secret does):
    ``tls.server_name`` verifies it by that name. The kubelet exec probe (common/probe.py) passes only then."""
    from stageserve.serving.common import probe
    from stageserve.serving.common.server import GrpcStage

    (tmp_path / "san.cnf").write_text("subjectAltName=DNS:demo.ml.svc\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "pod.key", "-out", "pod.csr", "-subj", "/CN=pod",
             cwd=tmp_path)
    _openssl("x509", "-req", "-in", "pod.csr", "-CA", str(certs / "ca.pem"), "-CAkey", str(certs / "ca.key"),
             "-CAcreateserial", "-out", "pod.pem", "-days", "2", "-extfile", "san.cnf", cwd=tmp_path)
    files = {"cert_file": str(tmp_path / "pod.pem"), "key_file": str(tmp_path / "pod.key"),
             "ca_file": str(certs / "ca.pem")}
    port = _free_port()
    configs = {}
    for name, server_name in (("named", "demo.ml.svc"), ("by_ip", "")):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({"tls": {"enabled": True, **files, "server_name": server_name}}))

    async def main():
        tls.configure(TlsConfig(True, **files, server_name="demo.ml.svc"))
        try:
            stage = GrpcStage(f"127.0.0.1:{port}", [])
            await stage.server.start()
            await stage.set_serving(True)
            args = ["--port", str(port), "--timeout", "3"]
            results = [await asyncio.to_thread(probe.main, ["--config", str(configs[n]), *args]) for n in configs]
            await stage.server.stop(0)
            return results
        finally:
            tls.configure(TlsConfig())

    assert asyncio.run(main()) == [0, 1]  # the IP is not in the certificate: refused without server_name
