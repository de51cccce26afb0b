"""Which Prometheus series feed the autoscaler, and how query results become a ``StageLoad`` (pure).

Every stage target carries a ``stage`` label (set by the PodMonitor relabeling in Kubernetes, by the
file_sd target list locally) and, in Kubernetes, a ``deployment`` label (the StageServeDeployment name).
Metric names are the ones the stages export (DESIGN §3): vLLM names for prefill/decode, stageserve names
for the encoder.
"""

from __future__ import annotations

from collections.abc import Mapping

from stageserve_operator.policy.autoscale import StageLoad

PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
ENCODER_PENDING = "stageserve_encoder_pending_image_tokens"
ENCODER_TOKENS = "stageserve_encoder_image_tokens_total"
PREFILL_TOKENS_PER_WAITING = 512.0  # tokens a waiting prefill request is assumed to hold (backlog estimate)


def selector(stage: str, deployment: str | None = None) -> str:
    matchers = [f'stage="{stage}"'] + ([f'deployment="{deployment}"'] if deployment else [])
    return "{" + ",".join(matchers) + "}"


def series(name: str, sel: str) -> str:
    """``name{sel}``; a name with colons also matches its underscore-escaped form.

    prometheus-client (>= 0.22) escapes ``:`` to ``_`` when a scraper negotiates OpenMetrics (Prometheus
    2.x does by default), so ``vllm:prompt_tokens_total`` may be stored as ``vllm_prompt_tokens_total``.
    """
    if ":" not in name:
        return f"{name}{sel}"
    pattern = name.replace(":", "[:_]")
    return "{" + f'__name__=~"{pattern}",' + sel[1:]


def stage_queries(stage: str, window: str, deployment: str | None = None) -> dict[str, str]:
    """Instant-vector PromQL per load field of ``stage`` (each query returns one scalar-like sample)."""
    sel = selector(stage, deployment)
    if stage == "encoder":
        return {
            "tokens_per_s": f"sum(rate({series(ENCODER_TOKENS, sel)}[{window}]))",
            "pending_tokens": f"sum({series(ENCODER_PENDING, sel)})",
        }
    if stage == "prefill":
        return {
            "tokens_per_s": f"sum(rate({series(PROMPT_TOKENS, sel)}[{window}]))",
            "pending_tokens": f"sum({series(WAITING, sel)}) * {PREFILL_TOKENS_PER_WAITING:g}",
        }
    if stage == "decode":
        return {
            "tokens_per_s": f"sum(rate({series(GENERATION_TOKENS, sel)}[{window}]))",
            "running_seqs": f"sum({series(RUNNING, sel)})",
            "kv_usage": f"avg({series(KV_USAGE, sel)})",
        }
    raise ValueError(f"stage: no load queries for {stage!r}")


def slo_histogram_query(stage: str, window: str, deployment: str | None = None) -> str | None:
    """Per-bucket rates of the histogram that defines the stage's SLO (TTFT for prefill, ITL for decode)."""
    name = {"prefill": TTFT, "decode": ITL}.get(stage)
    if name is None:
        return None
    return f"sum by (le) (rate({series(name + '_bucket', selector(stage, deployment))}[{window}]))"


def attainment(buckets: Mapping[float, float], slo_s: float) -> float | None:
    """Share of observations <= ``slo_s`` from cumulative bucket rates {le: rate}; None without traffic.

    Inside a bucket the share is interpolated linearly, as ``histogram_quantile`` does.
    """
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    lower_le, lower_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if slo_s <= le:
            if le == float("inf"):
                return min(1.0, lower_count / total)
            frac = (slo_s - lower_le) / (le - lower_le) if le > lower_le else 1.0
            return min(1.0, (lower_count + frac * (count - lower_count)) / total)
        lower_le, lower_count = le, count
    return min(1.0, lower_count / total)


def load_from_samples(values: Mapping[str, float | None], slo_attainment: float | None) -> StageLoad:
    """Builds a StageLoad from ``{field: value}`` (missing or NaN values count as 0)."""
    def get(name: str) -> float:
        v = values.get(name)
        return 0.0 if v is None or v != v else float(v)

    return StageLoad(
        tokens_per_s=get("tokens_per_s"),
        pending_tokens=get("pending_tokens"),
        running_seqs=get("running_seqs"),
        kv_usage=get("kv_usage"),
        slo_attainment=slo_attainment,
    )
