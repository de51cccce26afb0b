"""``stageserve up``: runs every stage as its own process on one machine and supervises them.

The supervisor writes the configuration to a temporary YAML file, starts the stages in dependency order
(throttler, encoder, decode, prefill, gateway), each replica as its own process in its own process group
(``python -m stageserve.serving.<stage> --config FILE --replica N``), and waits for each stage's replicas to
report ``SERVING`` on ``grpc.health.v1`` (the gateway also on ``GET /health``) before starting the next stage.
A child that exits during startup stops everything and raises :class:`StageFailed` with its exit code and the
last lines of its output. ``stop()`` sends SIGTERM to every process group, waits up to a grace period, then
sends SIGKILL, so no process is left behind. ``wait()`` blocks until SIGINT/SIGTERM or until a child dies.

Every child's stdout and stderr are forwarded line by line with a ``[stage-i]`` prefix, or written to
``LOG_DIR/stage-i.log`` when a log directory is given.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from stageserve.serving.common.config import (
    KV_FORMATS,
    REPLICA_PORT_STRIDE,
    STAGES,
    ConfigError,
    StageServeConfig,
    load_config,
)

START_ORDER = ("throttler", "encoder", "decode", "prefill", "gateway")
SINGLE_REPLICA_STAGES = ("gateway", "throttler")
DEFAULT_STARTUP_TIMEOUT_S = 300.0
DEFAULT_GRACE_S = 10.0
TAIL_LINES = 30
_POLL_S = 0.1

CommandFactory = Callable[[str, int, str], Sequence[str]]
"""(stage, replica, config_path) -> argv of the process that runs that replica."""


class StageFailed(RuntimeError):
    """A stage process exited or did not become healthy; the message names it and shows its last output."""


class StartupInterrupted(RuntimeError):
    """``request_stop()`` (e.g. from a signal handler) was called while the stages were starting."""


# ---- --replicas ---------------------------------------------------------------------------------------
def parse_replicas(spec: str | None) -> dict[str, int]:
    """Parses ``"prefill=2,decode=2"`` into ``{"prefill": 2, "decode": 2}``.

    Raises ValueError naming the bad item: unknown stage, missing ``=``, non-integer or non-positive count,
    a stage given twice, or a count other than 1 for the gateway or the throttler.
    """
    result: dict[str, int] = {}
    if spec is None or not spec.strip():
        return result
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        stage, sep, count_text = item.partition("=")
        stage, count_text = stage.strip(), count_text.strip()
        if not sep or not stage or not count_text:
            raise ValueError(f"--replicas: expected STAGE=COUNT, got {item!r}")
        if stage not in STAGES:
            raise ValueError(f"--replicas: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        try:
            count = int(count_text)
        except ValueError:
            raise ValueError(f"--replicas: {stage} count must be an integer, got {count_text!r}") from None
        if count < 1:
            raise ValueError(f"--replicas: {stage} count must be positive, got {count}")
        if stage in SINGLE_REPLICA_STAGES and count != 1:
            raise ValueError(f"--replicas: {stage} runs as a single replica, got {count}")
        if stage in result:
            raise ValueError(f"--replicas: {stage} given twice")
        result[stage] = count
    return result


def replica_count(config: StageServeConfig, stage: str) -> int:
    return int(getattr(getattr(config, stage), "replicas", 1))


# ---- ports --------------------------------------------------------------------------------------------
def offset_ports(config: StageServeConfig, offset: int) -> StageServeConfig:
    """Adds ``offset`` to every port of ``config`` (several pipelines on one machine)."""
    if offset == 0:
        return config
    changes: dict[str, Any] = {}
    for stage in STAGES:
        section = getattr(config, stage)
        ports = {f.name: getattr(section, f.name) + offset for f in dataclasses.fields(section) if _is_port(f.name)}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ConfigError(f"{stage}.{name}: port {port} out of range after offset {offset}")
        changes[stage] = dataclasses.replace(section, **ports)
    return dataclasses.replace(config, **changes)


def _is_port(name: str) -> bool:
    return name == "port" or name.endswith("_port")


def free_port_config(**overrides: Any) -> StageServeConfig:
    """A config whose every port (each stage, each replica at ``port + 10*i``, metrics too) is free now.

    ``overrides`` are ``load_config`` overrides (e.g. ``prefill={"replicas": 2}, kv_format="fp8"``); ports given
    explicitly there are kept. Ports are found by binding port 0 on the host and checking every replica's
    offset port too; all candidate sockets stay bound until the search ends, so the ports never overlap.
    """
    base = load_config(None, overrides)
    host = _connect_host(base.host)
    held: list[socket.socket] = []
    ports: dict[str, dict[str, int]] = {}
    try:
        for stage in STAGES:
            section = getattr(base, stage)
            count = replica_count(base, stage)
            for f in dataclasses.fields(section):
                if not _is_port(f.name):
                    continue
                # Only the serving and metrics ports repeat per replica; gateway ports are single.
                per_replica = count if stage != "gateway" else 1
                ports.setdefault(stage, {})[f.name] = _reserve_port_series(host, per_replica, held)
    finally:
        for sock in held:
            sock.close()
    merged: dict[str, Any] = {stage: dict(values) for stage, values in ports.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return load_config(None, merged)


def _reserve_port_series(host: str, count: int, held: list[socket.socket], attempts: int = 200) -> int:
    """Binds ``base + 10*i`` for i < count, with base from the OS; returns base. Sockets go into ``held``."""
    for _ in range(attempts):
        first = _bind(host, 0)
        assert first is not None  # binding port 0 raises rather than failing silently
        base = first.getsockname()[1]
        series = [first]
        for i in range(1, count):
            port = base + REPLICA_PORT_STRIDE * i
            sock = _bind(host, port) if port < 65536 else None
            if sock is None:
                break
            series.append(sock)
        if len(series) == count:
            held.extend(series)
            return base
        for sock in series:
            sock.close()
    raise RuntimeError(f"no free series of {count} ports on {host}")


def _bind(host: str, port: int) -> socket.socket | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        if port == 0:
            raise
        return None
    return sock


def _connect_host(host: str) -> str:
    """The address to reach a server bound on ``host`` (a wildcard bind is reached over loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ---- endpoints ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoints:
    openai_base_url: str  # http://host:8000/v1
    gateway_http: str  # http://host:8000 (also /health)
    gateway_grpc: str  # host:50051
    stages: dict[str, list[str]] = field(default_factory=dict)  # stage -> replica gRPC addresses
    metrics: dict[str, list[str]] = field(default_factory=dict)  # stage -> replica Prometheus /metrics URLs

    def format(self) -> str:
        lines = [
            f"OpenAI API    {self.openai_base_url}",
            f"gateway gRPC  {self.gateway_grpc}",
            f"gateway HTTP  {self.gateway_http}  (/health)",
        ]
        for stage, addresses in self.stages.items():
            for i, address in enumerate(addresses):
                lines.append(f"{stage}-{i:<{13 - len(stage) - 1}} {address}")
        for stage, urls in self.metrics.items():
            lines += [f"metrics       {url}  ({stage}-{i})" for i, url in enumerate(urls)]
        return "\n".join(lines)


def endpoints_for(config: StageServeConfig, stages: Iterable[str] = START_ORDER) -> Endpoints:
    http = f"http://{_hostport(config.host, config.gateway.http_port)}"
    return Endpoints(
        openai_base_url=f"{http}/v1",
        gateway_http=http,
        gateway_grpc=config.replica_address("gateway", 0),
        stages={stage: config.addresses(stage) for stage in STAGES if stage in set(stages)},
        metrics={stage: _metrics_urls(config, stage, http) for stage in STAGES if stage in set(stages)},
    )


def _metrics_urls(config: StageServeConfig, stage: str, gateway_http: str) -> list[str]:
    if stage == "gateway":
        return [f"{gateway_http}/metrics"]
    base = getattr(config, stage).metrics_port
    count = replica_count(config, stage)
    return [f"http://{_hostport(config.host, base + REPLICA_PORT_STRIDE * i)}/metrics" for i in range(count)]


# ---- processes ----------------------------------------------------------------------------------------
@dataclass
class StageProcess:
    stage: str
    replica: int
    address: str  # where its gRPC server listens
    popen: subprocess.Popen[str]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None
    finished: bool = False  # stopped and reaped: its pid (and process group id) may be reused, never signal it

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.replica}"

    @property
    def pid(self) -> int:
        return self.popen.pid


class Supervisor:
    """Starts, health-checks and stops every stage process of one pipeline.

    ``command`` (stage, replica, config_path) -> argv replaces the default ``python -m stageserve.serving.STAGE``
    launch (tests use a stand-in stage). ``stages`` restricts which stages run (default: all five).
    """

    def __init__(
        self,
        config: StageServeConfig,
        *,
        command: CommandFactory | None = None,
        stages: Iterable[str] = START_ORDER,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        grace_s: float = DEFAULT_GRACE_S,
        out: IO[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        wanted = set(stages)
        unknown = wanted - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage {sorted(unknown)[0]!r} (stages: {', '.join(STAGES)})")
        self.config = config
        self.stages = [stage for stage in START_ORDER if stage in wanted]
        self._command = command
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self._out = out
        self._env = dict(env) if env is not None else None
        self.processes: list[StageProcess] = []
        self.config_path: str | None = None
        self._tmpdir: str | None = None
        self._write_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._started = False
        self._stop_requested = threading.Event()

    # -- launch
    def command_for(self, stage: str, replica: int, config_path: str) -> list[str]:
        """The argv that runs one replica of ``stage``."""
        if self._command is not None:
            return list(self._command(stage, replica, config_path))
        return [sys.executable, "-m", f"stageserve.serving.{stage}", "--config", config_path, "--replica", str(replica)]

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        env["PYTHONUNBUFFERED"] = "1"
        # The children import stageserve from the same place as this process, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            env["PYTHONPATH"] = os.pathsep.join([root, *paths])
        return env

    def start(self) -> Endpoints:
        """Starts every stage in dependency order and returns once all are healthy.

        Raises StageFailed (after stopping everything) if a child exits or the startup deadline passes.
        """
        if self._started:
            raise RuntimeError("supervisor already started")
        self._started = True
        atexit.register(self.stop)
        self._tmpdir = tempfile.mkdtemp(prefix="stageserve-")
        self.config_path = os.path.join(self._tmpdir, "stageserve.yaml")
        Path(self.config_path).write_text(self.config.to_yaml())
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            for stage in self.stages:
                self._raise_if_stop_requested()
                launched = [self._spawn(stage, i) for i in range(replica_count(self.config, stage))]
                self._wait_healthy(launched, deadline)
        except BaseException:
            self.stop()
            raise
        endpoints = self.endpoints()
        self._log(f"all stages healthy ({len(self.processes)} processes)")
        return endpoints

    def endpoints(self) -> Endpoints:
        return endpoints_for(self.config, self.stages)

    def _spawn(self, stage: str, replica: int) -> StageProcess:
        assert self.config_path is not None
        argv = self.command_for(stage, replica, self.config_path)
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            env=self.child_env(),
            start_new_session=True,
        )
        proc = StageProcess(stage, replica, self.config.replica_address(stage, replica), popen)
        self.processes.append(proc)
        proc.reader = threading.Thread(target=self._forward, args=(proc,), name=f"output-{proc.name}", daemon=True)
        proc.reader.start()
        self._log(f"started {proc.name} (pid {proc.pid}) on {proc.address}")
        return proc

    def _forward(self, proc: StageProcess) -> None:
        assert proc.popen.stdout is not None
        sink = open(self.log_dir / f"{proc.name}.log", "a") if self.log_dir is not None else None
        try:
            for raw in proc.popen.stdout:
                line = raw.rstrip("\n")
                proc.tail.append(line)
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
                else:
                    self._write(f"[{proc.name}] {line}\n")
        except (OSError, ValueError):
            pass
        finally:
            if sink is not None:
                sink.close()

    def _write(self, text: str) -> None:
        out = self._out if self._out is not None else sys.stdout
        with self._write_lock:
            try:
                out.write(text)
                out.flush()
            except (OSError, ValueError):
                pass

    def _log(self, message: str) -> None:
        self._write(f"[supervisor] {message}\n")

    # -- health
    def _wait_healthy(self, procs: list[StageProcess], deadline: float, watch_all: bool = True) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from stageserve.serving.common import tls

        pending = list(procs)
        channels: dict[str, Any] = {}
        try:
            while pending:
                self._raise_if_stop_requested()
                self._raise_if_any_exited(None if watch_all else procs)
                for proc in list(pending):
                    if proc.address not in channels:
                        target = _hostport(
                            _connect_host(self.config.host), self.config.replica_port(proc.stage, proc.replica)
                        )
                        channels[proc.address] = tls.sync_channel(
                            target, self.config.tls, options=[("grpc.enable_http_proxy", 0)]
                        )
                    stub = health_pb2_grpc.HealthStub(channels[proc.address])
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    except grpc.RpcError:
                        continue
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        continue
                    if proc.stage == "gateway" and not self._http_healthy():
                        continue
                    pending.remove(proc)
                    self._log(f"{proc.name} is healthy")
                if not pending:
                    break
                if time.monotonic() > deadline:
                    names = ", ".join(p.name for p in pending)
                    raise StageFailed(
                        f"{names} not healthy after {self.startup_timeout_s:g}s"
                        + "".join(_tail_text(p) for p in pending)
                    )
                time.sleep(_POLL_S)
        finally:
            for channel in channels.values():
                channel.close()

    def _http_healthy(self) -> bool:
        url = f"http://{_hostport(_connect_host(self.config.host), self.config.gateway.http_port)}/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _raise_if_any_exited(self, among: list[StageProcess] | None = None) -> None:
        dead = self.first_exited(among)
        if dead is not None:
            if dead.reader is not None:
                dead.reader.join(timeout=2.0)  # collect its last lines
            raise StageFailed(f"{dead.name} exited during startup with code {dead.popen.returncode}" + _tail_text(dead))

    def request_stop(self) -> None:
        """Asks a running ``start()`` to give up (it then stops every child and raises StartupInterrupted).

        Safe to call from a signal handler or another thread; does nothing to already running stages otherwise.
        """
        self._stop_requested.set()

    def _raise_if_stop_requested(self) -> None:
        if self._stop_requested.is_set():
            raise StartupInterrupted("startup interrupted; stopping every stage")

    def first_exited(self, among: list[StageProcess] | None = None) -> StageProcess | None:
        """The first child (of ``among``, default all) that has exited, if any."""
        for proc in self.processes if among is None else among:
            if not proc.finished and proc.popen.poll() is not None:  # finished: ended on purpose (kill, stop)
                return proc
        return None

    # -- faults (tests, chaos benchmark)
    def process(self, stage: str, replica: int) -> StageProcess:
        """The latest process of one replica."""
        return [p for p in self.processes if p.stage == stage and p.replica == replica][-1]

    def kill(self, stage: str, replica: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signals one replica's process group and reaps it (SIGKILL: a crash; SIGTERM: a graceful drain)."""
        proc = self.process(stage, replica)
        proc.finished = True  # first: a concurrent restart's health wait must not take this death for its own
        _signal_group(proc.pid, sig)
        proc.popen.wait(timeout=60.0)
        self._log(f"{proc.name} (pid {proc.pid}) ended by {sig.name}")

    def restart(self, stage: str, replica: int) -> StageProcess:
        """Starts a replica again (after ``kill``) and waits until it is healthy."""
        old = self.process(stage, replica)
        if old.popen.poll() is None:
            raise RuntimeError(f"{old.name} is still running")
        self.processes.remove(old)
        proc = self._spawn(stage, replica)
        self._wait_healthy([proc], time.monotonic() + self.startup_timeout_s, watch_all=False)
        return proc

    # -- stop
    def stop(self) -> None:
        """SIGTERM to every process group (gateway first), SIGKILL after ``grace_s``; removes the temp config."""
        with self._stop_lock:
            procs = [proc for proc in reversed(self.processes) if not proc.finished]
            for proc in procs:
                if proc.popen.poll() is None:
                    _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for proc in procs:
                try:
                    proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._log(f"{proc.name} did not stop within {self.grace_s:g}s; killing it")
                    _signal_group(proc.pid, signal.SIGKILL)
            for proc in procs:
                # Anything left in a group (a child of a stage) is an orphan now: kill it too.
                _signal_group(proc.pid, signal.SIGKILL)
                try:
                    proc.popen.wait(timeout=5.0)
                    proc.finished = True
                except subprocess.TimeoutExpired:
                    self._log(f"{proc.name} (pid {proc.pid}) did not die")
            for proc in procs:
                if proc.reader is not None:
                    proc.reader.join(timeout=2.0)
                if proc.popen.stdout is not None:
                    proc.popen.stdout.close()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None
            atexit.unregister(self.stop)

    def wait(self, install_signal_handlers: bool = True) -> int:
        """Blocks until SIGINT/SIGTERM (returns 0) or until a child dies (returns 1); stops everything."""
        stop = threading.Event()
        received: list[int] = []
        previous: dict[int, Any] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():

            def handler(signum: int, frame: object) -> None:
                received.append(signum)
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            while not stop.wait(_POLL_S * 2):
                dead = self.first_exited()
                if dead is not None:
                    if dead.reader is not None:
                        dead.reader.join(timeout=2.0)
                    self._log(f"{dead.name} exited unexpectedly with code {dead.popen.returncode}; stopping all")
                    self.stop()
                    return 1
            self._log(f"received {signal.Signals(received[0]).name if received else 'stop'}; stopping all")
            self.stop()
            return 0
        finally:
            for restore, old in previous.items():
                signal.signal(restore, old)

    def __enter__(self) -> Supervisor:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail_text(proc: StageProcess) -> str:
    lines = list(proc.tail)
    if not lines:
        return f"\n  ({proc.name} printed nothing)"
    return f"\n  last output of {proc.name}:\n" + "\n".join(f"    {line}" for line in lines)


# ---- CLI ----------------------------------------------------------------------------------------------
def run_up(
    config_path: str | None,
    replicas: str | None = None,
    kv_format: str | None = None,
    *,
    host: str | None = None,
    http_port: int | None = None,
    base_port_offset: int = 0,
    log_dir: str | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    grace_s: float = DEFAULT_GRACE_S,
    command: CommandFactory | None = None,
) -> int:
    """``stageserve up``: starts the pipeline, prints the endpoints, serves until Ctrl-C/SIGTERM.

    Returns 0 after a clean stop, 1 if a stage failed (at startup or later), 2 for a bad configuration.
    """
    try:
        overrides: dict[str, Any] = {}
        for stage, count in parse_replicas(replicas).items():
            if stage not in SINGLE_REPLICA_STAGES:
                overrides[stage] = {"replicas": count}
        if kv_format is not None:
            overrides["kv_format"] = kv_format
        if host is not None:
            overrides["host"] = host
        if http_port is not None:
            overrides["gateway"] = {"http_port": http_port}
        config = offset_ports(load_config(config_path, overrides), base_port_offset)
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"stageserve up: error: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(
        config, command=command, log_dir=log_dir, startup_timeout_s=startup_timeout_s, grace_s=grace_s
    )
    # SIGINT/SIGTERM during startup must not kill us before the children (in their own sessions) are stopped:
    # the handler only flags the request; start() notices it, stops every child and raises StartupInterrupted.
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: supervisor.request_stop())
    try:
        endpoints = supervisor.start()  # stops every child itself on any exception
    except StageFailed as exc:
        print(f"stageserve up: error: {exc}", file=sys.stderr)
        return 1
    except StartupInterrupted:
        print("stageserve up: interrupted during startup; stopped", file=sys.stderr)
        return 130
    finally:
        for restore, old in previous.items():
            signal.signal(restore, old)
    print("stageserve is up:\n" + endpoints.format(), flush=True)
    return supervisor.wait()


def add_up_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``stageserve up`` on the CLI's subparsers; ``args.func(args)`` returns the exit code."""
    p = subparsers.add_parser("up", help="run every stage as its own process on this machine")
    p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("--replicas", default=None, help="replicas per stage, e.g. prefill=2,decode=2")
    p.add_argument("--kv-format", default=None, choices=list(KV_FORMATS), help="KV page format on the wire")
    p.add_argument("--host", default=None, help="address every stage binds (default from config: 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None, help="gateway OpenAI HTTP port (default 8000)")
    p.add_argument("--base-port-offset", type=int, default=0, metavar="N", help="add N to every port")
    p.add_argument("--log-dir", default=None, help="write each process's output to LOG_DIR/STAGE-I.log")
    p.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, help="seconds")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds to wait after SIGTERM")
    p.set_defaults(func=_up_from_args)
    return p


def _up_from_args(args: argparse.Namespace) -> int:
    return run_up(
        args.config,
        args.replicas,
        args.kv_format,
        host=args.host,
        http_port=args.http_port,
        base_port_offset=args.base_port_offset,
        log_dir=args.log_dir,
        startup_timeout_s=args.startup_timeout,
        grace_s=args.grace,
    )
