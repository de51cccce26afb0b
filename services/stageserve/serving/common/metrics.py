"""Prometheus metrics of every stage (DESIGN §3); the only module that imports prometheus_client.

Prefill and decode export the Model Server Protocol series under vLLM's names (``vllm:num_requests_waiting``,
``vllm:time_to_first_token_seconds``, ... with label ``model_name``), so dashboards, KEDA triggers and routers
written for vLLM read them unchanged. KV transfer, throttler, encoder and gateway series are ``stageserve_*``.
Each stage process serves them with :func:`serve` on its ``metrics_port``; the gateway on ``GET /metrics`` of
its HTTP port (:func:`render`). One process per stage replica, so no multiprocess mode is needed.

Label values a client chooses (user, app) go through :class:`LabelCap`, which keeps the first ``limit``
distinct values and maps every later one to ``"other"``: a client cannot blow up the series count.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

__all__ = ["CONTENT_TYPE", "REGISTRY", "CollectorRegistry"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format keeps the ':' of vLLM's names

# Buckets of vLLM's histograms (vllm/v1/metrics/loggers.py), so quantiles compare across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENCODER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

KV_FAILURE_REASONS = ("checksum", "resend", "not_committed", "rpc_error")
THROTTLER_DECISIONS = ("admitted", "queued", "rejected")
OTHER = "other"
DEFAULT_LABEL_LIMIT = 20

# ---- every stage -------------------------------------------------------------------------------------------
STAGE_INFO = Gauge(
    "stageserve_stage_info",
    "1 for each running stage replica",
    ["stage", "replica", "model_name", "version"],
    registry=None,
)

# ---- prefill / decode: the Model Server Protocol under vLLM's names ----------------------------------------
NUM_WAITING = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", ["model_name"], registry=None)
NUM_RUNNING = Gauge("vllm:num_requests_running", "Requests in the running batch", ["model_name"], registry=None)
KV_USAGE = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", ["model_name"], registry=None)
PROMPT_TOKENS = Counter("vllm:prompt_tokens", "Prompt tokens processed", ["model_name"], registry=None)
GENERATION_TOKENS = Counter("vllm:generation_tokens", "Tokens generated", ["model_name"], registry=None)
TTFT = Histogram(
    "vllm:time_to_first_token_seconds",
    "Time to first token at this stage",
    ["model_name"],
    buckets=TTFT_BUCKETS,
    registry=None,
)
ITL = Histogram(
    "vllm:inter_token_latency_seconds", "Time between output tokens", ["model_name"], buckets=ITL_BUCKETS, registry=None
)
E2E = Histogram(
    "vllm:e2e_request_latency_seconds",
    "Request latency at this stage",
    ["model_name"],
    buckets=E2E_BUCKETS,
    registry=None,
)

# ---- KV transfer (counted by the sender, prefill) ----------------------------------------------------------
KV_BYTES = Counter("stageserve_kv_transfer_bytes", "KV page payload bytes sent to decode", ["format"], registry=None)
KV_BF16_BYTES = Counter(
    "stageserve_kv_transfer_bf16_bytes",
    "What the same KV pages weigh in bf16 (compression ratio numerator)",
    ["format"],
    registry=None,
)
KV_TOKENS = Counter(
    "stageserve_kv_transfer_tokens", "Prompt tokens whose KV was sent to decode", ["format"], registry=None
)
KV_SECONDS = Histogram(
    "stageserve_kv_transfer_seconds",
    "KV push duration, first frame to commit (layer-wise: overlaps the prefill forward pass)",
    ["format"],
    buckets=TRANSFER_BUCKETS,
    registry=None,
)
KV_EXPOSED_SECONDS = Histogram(
    "stageserve_kv_transfer_exposed_seconds",
    "KV transfer time not hidden behind prefill compute (forward pass end to commit)",
    ["format"],
    buckets=TRANSFER_BUCKETS,
    registry=None,
)
KV_FAILURES = Counter("stageserve_kv_transfer_failures", "KV transfer failures", ["reason"], registry=None)

# ---- throttler ---------------------------------------------------------------------------------------------
THROTTLER_DECISIONS_TOTAL = Counter(
    "stageserve_throttler_decisions", "Admission decisions", ["decision", "app"], registry=None
)
THROTTLER_OVERLOADED = Gauge(
    "stageserve_throttler_overloaded", "1 while the throttler considers the pipeline full", registry=None
)
THROTTLER_SERVICE_GAP = Gauge(
    "stageserve_throttler_service_gap_tokens", "Max weighted-token counter gap among backlogged users", registry=None
)
THROTTLER_QUEUED = Gauge("stageserve_throttler_queued_requests", "Requests waiting for admission", registry=None)
THROTTLER_REDIS_DEGRADED = Gauge(
    "stageserve_throttler_redis_degraded",
    "1 while the shared Redis state is unreachable (local decisions)",
    registry=None,
)
THROTTLED_INTERACTIONS = Counter(
    "stageserve_throttler_throttled_interactions",
    "Interactions with at least one delayed or rejected call",
    ["app"],
    registry=None,
)

# ---- encoder -----------------------------------------------------------------------------------------------
ENCODER_PENDING = Gauge(
    "stageserve_encoder_pending_image_tokens", "Image tokens queued or being encoded", registry=None
)
ENCODER_IMAGE_TOKENS = Counter("stageserve_encoder_image_tokens", "Image tokens encoded", registry=None)
ENCODER_LATENCY = Histogram(
    "stageserve_encoder_latency_seconds", "Encode latency per request", buckets=ENCODER_BUCKETS, registry=None
)

# ---- gateway (as the client sees it) -----------------------------------------------------------------------
GATEWAY_REQUESTS = Counter(
    "stageserve_gateway_requests", "Requests by status (HTTP status code, or its gRPC equivalent)",
    ["model_name", "protocol", "code"], registry=None,
)  # fmt: skip
GATEWAY_TTFT = Histogram(
    "stageserve_gateway_time_to_first_token_seconds", "Client-seen time to first token", ["model_name"],
    buckets=TTFT_BUCKETS, registry=None,
)  # fmt: skip
GATEWAY_ITL = Histogram(
    "stageserve_gateway_inter_token_latency_seconds", "Client-seen time between tokens", ["model_name"],
    buckets=ITL_BUCKETS, registry=None,
)  # fmt: skip
GATEWAY_E2E = Histogram(
    "stageserve_gateway_e2e_request_latency_seconds", "Client-seen request latency", ["model_name"],
    buckets=E2E_BUCKETS, registry=None,
)  # fmt: skip


class CallbackCounters:
    """Counters owned by another object (e.g. the gateway's migration stats), read at scrape time."""

    def __init__(self) -> None:
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.counters[name] = (documentation, read)

    def collect(self) -> Iterable[CounterMetricFamily]:
        for name, (documentation, read) in self.counters.items():
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], float(read()))
            yield family


GATEWAY_CALLBACKS = CallbackCounters()
GATEWAY_COUNTERS = {
    "stageserve_gateway_migrations": "Re-dispatches of a request to other replicas after a stage failed",
    "stageserve_gateway_migrated_requests": "Requests that were migrated at least once",
    "stageserve_gateway_migrations_exhausted": "Requests that failed after using up their migrations",
    "stageserve_gateway_throttler_fallback_admissions": "Requests admitted locally while the throttler was down",
}


def bind_gateway_counters(reads: dict[str, Callable[[], float]]) -> None:
    """``reads``: GATEWAY_COUNTERS name -> a function returning that counter's current total."""
    for name, read in reads.items():
        GATEWAY_CALLBACKS.add(name, GATEWAY_COUNTERS[name], read)


GROUPS: dict[str, tuple[Any, ...]] = {
    "engine": (NUM_WAITING, NUM_RUNNING, KV_USAGE, PROMPT_TOKENS, GENERATION_TOKENS, TTFT, ITL, E2E),
    "kv_transfer": (KV_BYTES, KV_BF16_BYTES, KV_TOKENS, KV_SECONDS, KV_EXPOSED_SECONDS, KV_FAILURES),
    "throttler": (
        THROTTLER_DECISIONS_TOTAL, THROTTLER_OVERLOADED, THROTTLER_SERVICE_GAP, THROTTLER_QUEUED,
        THROTTLED_INTERACTIONS, THROTTLER_REDIS_DEGRADED,
    ),
    "encoder": (ENCODER_PENDING, ENCODER_IMAGE_TOKENS, ENCODER_LATENCY),
    "gateway": (GATEWAY_REQUESTS, GATEWAY_TTFT, GATEWAY_ITL, GATEWAY_E2E, GATEWAY_CALLBACKS),
}  # fmt: skip
"""Which metrics each kind of process exports (a stage exports only its own, never another stage's zeros)."""
_enabled: weakref.WeakKeyDictionary[CollectorRegistry, set[str]] = weakref.WeakKeyDictionary()
_enable_lock = threading.Lock()


def enable(*groups: str, registry: CollectorRegistry = REGISTRY) -> None:
    """Registers the metric groups this process exports (plus ``stageserve_stage_info``); idempotent."""
    with _enable_lock:
        done = _enabled.setdefault(registry, set())
        for group in ("info", *groups):
            if group != "info" and group not in GROUPS:
                raise ValueError(f"metrics group: unknown {group!r} (known: {', '.join(GROUPS)})")
            if group in done:
                continue
            for metric in (STAGE_INFO,) if group == "info" else GROUPS[group]:
                registry.register(metric)
            done.add(group)


# ---- helpers -----------------------------------------------------------------------------------------------
class LabelCap:
    """Caps the distinct values of a client-supplied label: the first ``limit`` values pass, later ones are
    ``"other"``. Values are also truncated to ``max_len`` characters; empty values become ``"unknown"``."""

    def __init__(self, limit: int = DEFAULT_LABEL_LIMIT, max_len: int = 64) -> None:
        if limit < 1:
            raise ValueError("limit: must be >= 1")
        self.limit = limit
        self.max_len = max_len
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = value[: self.max_len] or "unknown"
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


APP_LABEL = LabelCap()


class RequestTimer:
    """TTFT, inter-token latency and end-to-end latency of one request, observed into three histograms.

    ``tokens(n, now)`` is called per output event: the first records TTFT, later ones ITL (per token, as vLLM
    does, when an event carries several tokens); ``finish(now)`` records the end-to-end latency once."""

    def __init__(self, ttft: Histogram, itl: Histogram, e2e: Histogram, model_name: str, start: float) -> None:
        self._ttft, self._itl, self._e2e = (h.labels(model_name=model_name) for h in (ttft, itl, e2e))
        self.start = start
        self.last: float | None = None
        self.done = False

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.last is None:
            self._ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self.last = now

    def finish(self, now: float) -> None:
        if not self.done:
            self.done = True
            self._e2e.observe(now - self.start)


def engine_timer(model_name: str, start: float | None = None) -> RequestTimer:
    """A timer over the vLLM-named histograms (prefill, decode)."""
    return RequestTimer(TTFT, ITL, E2E, model_name, time.perf_counter() if start is None else start)


def gateway_timer(model_name: str, start: float | None = None) -> RequestTimer:
    """A timer over the client-seen gateway histograms."""
    return RequestTimer(
        GATEWAY_TTFT, GATEWAY_ITL, GATEWAY_E2E, model_name, time.perf_counter() if start is None else start
    )


def set_stage_info(stage: str, replica: int, model_name: str) -> None:
    from stageserve import __version__

    STAGE_INFO.labels(stage=stage, replica=str(replica), model_name=model_name, version=__version__).set(1)


def bind_engine_load(model_name: str, load: Callable[[], object]) -> None:
    """Makes the three vLLM gauges read ``load()`` (an object with num_waiting, num_running, kv_cache_usage)
    at scrape time, and creates the token counters and latency histograms at zero."""
    NUM_WAITING.labels(model_name=model_name).set_function(lambda: load().num_waiting)  # type: ignore[attr-defined]
    NUM_RUNNING.labels(model_name=model_name).set_function(lambda: load().num_running)  # type: ignore[attr-defined]
    KV_USAGE.labels(model_name=model_name).set_function(lambda: load().kv_cache_usage)  # type: ignore[attr-defined]
    for metric in (PROMPT_TOKENS, GENERATION_TOKENS, TTFT, ITL, E2E):
        metric.labels(model_name=model_name)


def count_prompt_tokens(model_name: str, n: int) -> None:
    PROMPT_TOKENS.labels(model_name=model_name).inc(n)


def count_generation_tokens(model_name: str, n: int) -> None:
    GENERATION_TOKENS.labels(model_name=model_name).inc(n)


def init_kv_transfer(formats: Iterable[str]) -> None:
    """Creates every KV transfer series at zero, so rules and panels see them before the first failure."""
    for fmt in formats:
        for metric in (KV_BYTES, KV_BF16_BYTES, KV_TOKENS, KV_SECONDS, KV_EXPOSED_SECONDS):
            metric.labels(format=fmt)
    for reason in KV_FAILURE_REASONS:
        KV_FAILURES.labels(reason=reason)


def record_kv_transfer(
    fmt: str, payload_bytes: int, bf16_bytes: int, tokens: int, seconds: float, exposed_seconds: float = 0.0
) -> None:
    KV_EXPOSED_SECONDS.labels(format=fmt).observe(exposed_seconds)
    KV_BYTES.labels(format=fmt).inc(payload_bytes)
    KV_BF16_BYTES.labels(format=fmt).inc(bf16_bytes)
    KV_TOKENS.labels(format=fmt).inc(tokens)
    KV_SECONDS.labels(format=fmt).observe(seconds)


def kv_transfer_failed(reason: str, n: int = 1) -> None:
    if reason not in KV_FAILURE_REASONS:
        raise ValueError(f"reason: unknown KV transfer failure reason {reason!r}")
    KV_FAILURES.labels(reason=reason).inc(n)


def init_throttler(apps: Iterable[str] = ("default",)) -> None:
    for app in apps:
        for decision in THROTTLER_DECISIONS:
            THROTTLER_DECISIONS_TOTAL.labels(decision=decision, app=APP_LABEL(app))
        THROTTLED_INTERACTIONS.labels(app=APP_LABEL(app))
    THROTTLER_OVERLOADED.set(0)
    THROTTLER_SERVICE_GAP.set(0)
    THROTTLER_QUEUED.set(0)
    THROTTLER_REDIS_DEGRADED.set(0)


class ThrottleRecorder:
    """Counts admission decisions per (capped) app and each interaction's first delay or rejection once."""

    def __init__(self, remember: int = 100_000) -> None:
        self._throttled: dict[str, None] = {}  # insertion-ordered set of interaction ids, bounded
        self._remember = remember

    def decision(self, decision: str, app: str, interaction_id: str = "") -> None:
        if decision not in THROTTLER_DECISIONS:
            raise ValueError(f"decision: must be one of {', '.join(THROTTLER_DECISIONS)}, got {decision!r}")
        label = APP_LABEL(app)
        THROTTLER_DECISIONS_TOTAL.labels(decision=decision, app=label).inc()
        if decision != "admitted" and interaction_id and interaction_id not in self._throttled:
            self._throttled[interaction_id] = None
            if len(self._throttled) > self._remember:
                self._throttled.pop(next(iter(self._throttled)))
            THROTTLED_INTERACTIONS.labels(app=label).inc()


def bind_throttler(
    overloaded: Callable[[], bool],
    service_gap_tokens: Callable[[], float],
    queued: Callable[[], int],
    redis_degraded: Callable[[], bool] = lambda: False,
) -> Callable[..., None]:
    """Makes the throttler gauges read its state at scrape time; returns the decision listener to register
    (``listener(decision, app, interaction_id="")``)."""
    THROTTLER_OVERLOADED.set_function(lambda: 1.0 if overloaded() else 0.0)
    THROTTLER_SERVICE_GAP.set_function(lambda: float(service_gap_tokens()))
    THROTTLER_QUEUED.set_function(lambda: float(queued()))
    THROTTLER_REDIS_DEGRADED.set_function(lambda: 1.0 if redis_degraded() else 0.0)
    return ThrottleRecorder().decision


def set_throttler_state(overloaded: bool, service_gap_tokens: float, queued: int) -> None:
    THROTTLER_OVERLOADED.set(1 if overloaded else 0)
    THROTTLER_SERVICE_GAP.set(service_gap_tokens)
    THROTTLER_QUEUED.set(queued)


def init_encoder() -> None:
    ENCODER_PENDING.set(0)


def record_encode(image_tokens: int, seconds: float) -> None:
    ENCODER_IMAGE_TOKENS.inc(image_tokens)
    ENCODER_LATENCY.observe(seconds)


def init_gateway(model_name: str) -> None:
    for metric in (GATEWAY_TTFT, GATEWAY_ITL, GATEWAY_E2E):
        metric.labels(model_name=model_name)
    for code in ("200", "400", "429", "500", "503"):
        GATEWAY_REQUESTS.labels(model_name=model_name, protocol="http", code=code)


def count_gateway_request(model_name: str, protocol: str, code: int | str) -> None:
    GATEWAY_REQUESTS.labels(model_name=model_name, protocol=protocol, code=str(code)).inc()


# ---- exposition --------------------------------------------------------------------------------------------
def serve(port: int, host: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> ThreadingHTTPServer:
    """Serves ``GET /metrics`` of ``registry`` on ``host:port`` from a daemon thread.

    Always in the classic text format (0.0.4): prometheus_client's OpenMetrics output, which Prometheus asks for
    first, escapes the ':' of vLLM's names to '_' (``vllm_num_requests_running``), which dashboards would miss."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404, "only /metrics is served here")
                return
            body = render(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every second: no access log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition of ``registry`` (the gateway serves it on ``GET /metrics``)."""
    return generate_latest(registry)
