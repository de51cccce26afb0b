"""The supervisor behind ``stageserve up``: replica parsing, free ports, and real process management.

The processes are a tiny stand-in stage written to tmp_path (a grpc.aio server reporting SERVING on
grpc.health.v1, plus GET /health for the gateway, exiting on SIGTERM), so no model is loaded.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from stageserve.serving.common.config import STAGES, load_config
from stageserve.serving.supervisor import (
    StageFailed,
    Supervisor,
    add_up_parser,
    free_port_config,
    offset_ports,
    parse_replicas,
    run_up,
)

FAKE_STAGE = textwrap.dedent(
    """
    import argparse, asyncio, os, signal, subprocess, sys

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from stageserve.serving.common.config import load_config

    p = argparse.ArgumentParser()
    p.add_argument("stage")
    p.add_argument("--config", required=True)
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--grandchild", action="store_true")
    args = p.parse_args()
    config = load_config(args.config)
    print(f"fake {args.stage} replica {args.replica} pid {os.getpid()}", flush=True)
    if args.crash:
        print("boom: cannot load weights", flush=True)
        sys.exit(3)
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"grandchild {child.pid}", flush=True)


    async def http_health(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        await writer.drain()
        writer.close()


    async def main():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(config.replica_address(args.stage, args.replica))
        await server.start()
        if args.stage == "gateway":
            await asyncio.start_server(http_health, config.host, config.gateway.http_port)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        print("serving", flush=True)
        stop = asyncio.Event()
        if args.ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.2)
        print("stopped cleanly", flush=True)


    asyncio.run(main())
    """
)


@pytest.fixture
def fake(tmp_path: Path):
    """fake(crash={"decode"}, ...) -> a command factory launching the stand-in stage with those behaviours."""
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)

    def make(crash=(), ignore_term=(), grandchild=()):
        def command(stage: str, replica: int, config_path: str) -> list[str]:
            argv = [sys.executable, str(script), stage, "--config", config_path, "--replica", str(replica)]
            flags = {"--crash": crash, "--ignore-term": ignore_term, "--grandchild": grandchild}
            return argv + [flag for flag, stages in flags.items() if stage in stages]

        return command

    return make


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (read from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def all_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- parse_replicas --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, {}),
        ("", {}),
        ("prefill=2,decode=2", {"prefill": 2, "decode": 2}),
        (" decode = 3 , encoder=1 ,", {"decode": 3, "encoder": 1}),
        ("gateway=1,throttler=1", {"gateway": 1, "throttler": 1}),
    ],
)
def test_parse_replicas(spec, expected):
    assert parse_replicas(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("decoder=2", "unknown stage 'decoder'"),
        ("prefill=0", "prefill count must be positive"),
        ("decode=-1", "decode count must be positive"),
        ("decode=two", "decode count must be an integer"),
        ("decode", "expected STAGE=COUNT"),
        ("=2", "expected STAGE=COUNT"),
        ("gateway=2", "gateway runs as a single replica"),
        ("throttler=3", "throttler runs as a single replica"),
        ("decode=1,decode=2", "decode given twice"),
    ],
)
def test_parse_replicas_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_replicas(spec)


# ---- ports -----------------------------------------------------------------------------------------
def _all_ports(config) -> list[int]:
    ports = [config.gateway.http_port, config.gateway.grpc_port]
    for stage in ("throttler", "encoder", "prefill", "decode"):
        section = getattr(config, stage)
        for i in range(getattr(section, "replicas", 1)):
            ports += [section.port + 10 * i, section.metrics_port + 10 * i]
    return ports


def test_free_port_config_gives_distinct_bindable_ports():
    config = free_port_config(encoder={"replicas": 2}, prefill={"replicas": 3}, decode={"replicas": 2}, kv_format="fp8")
    assert (config.encoder.replicas, config.prefill.replicas, config.decode.replicas) == (2, 3, 2)
    assert config.kv_format == "fp8"
    assert config.addresses("prefill")[2] == f"127.0.0.1:{config.prefill.port + 20}"
    ports = _all_ports(config)
    assert len(ports) == len(set(ports)) == 2 + 2 + 2 * 2 + 2 * 3 + 2 * 2
    sockets = []
    try:
        for port in ports:
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sockets.append(sock)
    finally:
        for sock in sockets:
            sock.close()


def test_free_port_config_keeps_explicit_ports():
    config = free_port_config(throttler={"port": 41234})
    assert config.throttler.port == 41234
    assert config.decode.port not in (50055, 41234)


def test_offset_ports_shifts_every_port():
    base = load_config(None)
    shifted = offset_ports(base, 1000)
    assert shifted.gateway.http_port == 9000 and shifted.gateway.grpc_port == 51051
    assert shifted.decode.port == 51055 and shifted.decode.metrics_port == 10105
    assert shifted.decode.dtype == base.decode.dtype
    assert _all_ports(shifted) == [p + 1000 for p in _all_ports(base)]
    with pytest.raises(ValueError, match="out of range"):
        offset_ports(base, 60000)


# ---- process management ----------------------------------------------------------------------------
def test_starts_every_stage_and_stops_without_orphans(fake):
    config = free_port_config(decode={"replicas": 2})
    out = io.StringIO()
    sup = Supervisor(config, command=fake(grandchild={"prefill"}), out=out, startup_timeout_s=60, grace_s=5)
    with sup:
        endpoints = sup.endpoints()
        names = [p.name for p in sup.processes]
        pids = [p.pid for p in sup.processes]
        assert names == ["throttler-0", "encoder-0", "decode-0", "decode-1", "prefill-0", "gateway-0"]
        assert all(alive(pid) for pid in pids)
        assert endpoints.openai_base_url == f"http://127.0.0.1:{config.gateway.http_port}/v1"
        assert endpoints.gateway_grpc == f"127.0.0.1:{config.gateway.grpc_port}"
        assert endpoints.stages["decode"] == config.addresses("decode")
        assert f"{config.addresses('decode')[1]}" in endpoints.format()
        config_path = sup.config_path
        assert config_path is not None and load_config(config_path) == config
        grandchild = int(re.search(r"\[prefill-0\] grandchild (\d+)", out.getvalue()).group(1))
        assert alive(grandchild)
    assert all_gone([*pids, grandchild])
    text = out.getvalue()
    assert "[decode-1] serving" in text and "[gateway-0] stopped cleanly" in text  # SIGTERM, not SIGKILL
    assert "killing" not in text
    assert not Path(config_path).exists()


def test_child_crashing_at_startup_names_it_and_stops_the_rest(fake):
    config = free_port_config()
    out = io.StringIO()
    sup = Supervisor(config, command=fake(crash={"decode"}), out=out, startup_timeout_s=60, grace_s=5)
    with pytest.raises(StageFailed, match=r"decode-0 exited during startup with code 3") as info:
        sup.start()
    assert "boom: cannot load weights" in str(info.value)
    assert [p.name for p in sup.processes] == ["throttler-0", "encoder-0", "decode-0"]  # later stages never ran
    assert all_gone([p.pid for p in sup.processes])


def test_child_ignoring_sigterm_is_killed_after_grace(fake, tmp_path):
    config = free_port_config()
    out = io.StringIO()
    sup = Supervisor(
        config,
        command=fake(ignore_term={"encoder"}),
        stages=("encoder",),
        log_dir=tmp_path / "logs",
        out=out,
        startup_timeout_s=60,
        grace_s=0.5,
    )
    sup.start()
    pid = sup.processes[0].pid
    start = time.monotonic()
    sup.stop()
    assert time.monotonic() - start < 5
    assert all_gone([pid])
    assert "encoder-0 did not stop within 0.5s; killing it" in out.getvalue()
    assert "[encoder-0]" not in out.getvalue()  # the output went to the log file instead
    assert "serving" in (tmp_path / "logs" / "encoder-0.log").read_text()


def test_wait_stops_everything_and_fails_when_a_child_dies(fake):
    config = free_port_config()
    out = io.StringIO()
    sup = Supervisor(config, command=fake(), stages=("throttler", "decode"), out=out, startup_timeout_s=60)
    sup.start()
    pids = [p.pid for p in sup.processes]
    threading.Timer(0.3, os.kill, (pids[1], signal.SIGKILL)).start()
    assert sup.wait(install_signal_handlers=False) == 1
    assert all_gone(pids)
    assert "decode-0 exited unexpectedly with code -9" in out.getvalue()


def test_run_up_serves_until_sigterm(fake, tmp_path, capsys):
    config_file = tmp_path / "stageserve.yaml"
    config_file.write_text(free_port_config().to_yaml())
    original = signal.getsignal(signal.SIGTERM)
    seen: dict[str, list[int]] = {}

    def send_sigterm_once_waiting() -> None:
        # wait() installs its handler once every stage is healthy (start() has its own, a lambda, before that).
        deadline = time.monotonic() + 60
        while getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "handler" and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["pids"] = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", capsys.readouterr().out)]
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send_sigterm_once_waiting)
    thread.start()
    code = run_up(str(config_file), "prefill=2", "bf16", command=fake(), startup_timeout_s=60, grace_s=5)
    thread.join()
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is original  # handlers restored
    assert len(seen["pids"]) == 6
    assert all_gone(seen["pids"])


def test_run_up_sigterm_during_startup_stops_what_started(fake, tmp_path, capsys):
    config_file = tmp_path / "stageserve.yaml"
    config_file.write_text(free_port_config().to_yaml())
    original = signal.getsignal(signal.SIGTERM)

    def send_sigterm_during_startup() -> None:
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) is original and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # a stage or two are starting
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send_sigterm_during_startup)
    thread.start()
    code = run_up(str(config_file), None, None, command=fake(), startup_timeout_s=60, grace_s=5)
    thread.join()
    captured = capsys.readouterr()
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", captured.out)]
    assert code == 130 and "interrupted during startup" in captured.err
    assert 1 <= len(pids) < 5
    assert all_gone(pids)
    assert signal.getsignal(signal.SIGTERM) is original


def test_run_up_rejects_bad_input_without_starting_anything(capsys):
    assert run_up(None, "decode=0", None) == 2
    assert "decode count must be positive" in capsys.readouterr().err
    assert run_up(None, None, "hack7") == 2
    assert "kv_format" in capsys.readouterr().err
    assert run_up("/nonexistent/stageserve.yaml", None, None) == 2


def test_add_up_parser_registers_flags():
    parser = argparse.ArgumentParser(prog="stageserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_up_parser(sub)
    args = parser.parse_args(
        ["up", "--config", "c.yaml", "--replicas", "prefill=2,decode=2", "--kv-format", "fp8", "--host", "0.0.0.0"]
        + ["--http-port", "8100", "--base-port-offset", "100"]
    )
    assert (args.config, args.replicas, args.kv_format, args.host) == ("c.yaml", "prefill=2,decode=2", "fp8", "0.0.0.0")
    assert (args.http_port, args.base_port_offset) == (8100, 100)
    assert callable(args.func)
    defaults = parser.parse_args(["up"])
    assert (defaults.config, defaults.replicas, defaults.kv_format, defaults.base_port_offset) == (None, None, None, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--kv-format", "int3"])


def test_stages_are_validated():
    with pytest.raises(ValueError, match="unknown stage 'router'"):
        Supervisor(load_config(None), stages=("router",))
    assert set(STAGES) == {"gateway", "throttler", "encoder", "prefill", "decode"}
