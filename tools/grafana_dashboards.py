# ruff: noqa: E501  (the dashboard table keeps one panel per line)
"""Writes the Grafana dashboards of ``deploy/grafana/`` (run from the repo root: ``python tools/grafana_dashboards.py``).

Every dashboard has the variables ``datasource`` (a Prometheus), ``model_name`` and ``stage``; panel queries use
Grafana's ``$__rate_interval``. The JSON files are what is committed and tested (tests/services/test_observability_prometheus.py);
this script is how they are kept uniform.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'
S = 'stage=~"$stage"'
RI = "$__rate_interval"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


def quantiles(metric: str, sel: str, by: str = "", ps: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[dict[str, Any]]:
    group = f"le{', ' + by if by else ''}"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RI}])))", f"{prefix}p{int(p * 100)}")
        for p in ps
    ]


def panel(title: str, targets: list[dict[str, Any]], unit: str = "short", kind: str = "timeseries") -> dict[str, Any]:
    return {"title": title, "type": kind, "unit": unit, "targets": targets}


DASHBOARDS: dict[str, dict[str, Any]] = {
    "overview": {
        "title": "stageserve / Overview",
        "panels": [
            panel("Requests/s by status", [q(f"sum by (protocol, code) (rate(stageserve_gateway_requests_total{{{M}}}[{RI}]))", "{{protocol}} {{code}}")], "reqps"),
            panel("Error ratio", [q(f'sum(rate(stageserve_gateway_requests_total{{{M}, code!~"2..|OK"}}[{RI}])) / clamp_min(sum(rate(stageserve_gateway_requests_total{{{M}}}[{RI}])), 1e-9)', "errors")], "percentunit"),
            panel("Time to first token (client)", quantiles("stageserve_gateway_time_to_first_token_seconds", M), "s"),
            panel("Inter-token latency (client)", quantiles("stageserve_gateway_inter_token_latency_seconds", M), "s"),
            panel("End-to-end latency (client)", quantiles("stageserve_gateway_e2e_request_latency_seconds", M), "s"),
            panel("Tokens/s", [
                q(f"sum(rate(vllm:prompt_tokens_total{{{M}}}[{RI}]))", "prompt"),
                q(f"sum(rate(vllm:generation_tokens_total{{{M}}}[{RI}]))", "generation"),
            ], "short"),
        ],
    },
    "stages": {
        "title": "stageserve / Stages",
        "panels": [
            panel("Replicas up", [q(f"count by (stage) (stageserve_stage_info{{{S}}})", "{{stage}}")], "short"),
            panel("Scrape targets down", [q(f'count by (stage) (up{{{S}}} == 0) or count by (stage) (up{{{S}}}) * 0', "{{stage}}")], "short"),
            panel("Requests waiting", [q(f"sum by (stage) (vllm:num_requests_waiting{{{M}, {S}}})", "{{stage}}")], "short"),
            panel("Requests running", [q(f"sum by (stage) (vllm:num_requests_running{{{M}, {S}}})", "{{stage}}")], "short"),
            panel("KV cache usage", [q(f"max by (stage, instance) (vllm:kv_cache_usage_perc{{{M}, {S}}})", "{{stage}} {{instance}}")], "percentunit"),
            panel("Time to first token by stage (p99)", [q(f"histogram_quantile(0.99, sum by (le, stage) (rate(vllm:time_to_first_token_seconds_bucket{{{M}, {S}}}[{RI}])))", "{{stage}}")], "s"),
            panel("Inter-token latency at decode", quantiles("vllm:inter_token_latency_seconds", f"{M}, {S}"), "s"),
            panel("Gateway fail-overs/s", [
                q(f"sum(rate(stageserve_gateway_migrations_total{{{S}}}[{RI}]))", "decode migrations"),
                q(f"sum(rate(stageserve_gateway_migrations_exhausted_total{{{S}}}[{RI}]))", "migrations exhausted"),
                q(f"sum(rate(stageserve_gateway_throttler_fallback_admissions_total{{{S}}}[{RI}]))", "throttler fail-open admissions"),
            ], "short"),
            panel("Stage latency (p99)", [q(f"histogram_quantile(0.99, sum by (le, stage) (rate(vllm:e2e_request_latency_seconds_bucket{{{M}, {S}}}[{RI}])))", "{{stage}}")], "s"),
        ],
    },
    "kv-transfer": {
        "title": "stageserve / KV transfer",
        "panels": [
            panel("KV bytes/s by format", [q(f"sum by (format) (rate(stageserve_kv_transfer_bytes_total{{{S}}}[{RI}]))", "{{format}}")], "Bps"),
            panel("Compression ratio vs bf16", [q(f"sum by (format) (rate(stageserve_kv_transfer_bf16_bytes_total{{{S}}}[{RI}])) / sum by (format) (rate(stageserve_kv_transfer_bytes_total{{{S}}}[{RI}]))", "{{format}}")], "short"),
            panel("Bytes per token by format", [q(f"sum by (format) (rate(stageserve_kv_transfer_bytes_total{{{S}}}[{RI}])) / sum by (format) (rate(stageserve_kv_transfer_tokens_total{{{S}}}[{RI}]))", "{{format}}")], "decbytes"),
            panel("KV transfer time (push, overlaps prefill)", quantiles("stageserve_kv_transfer_seconds", S, "format", (0.5, 0.99)), "s"),
            panel("KV transfer time exposed after prefill", quantiles("stageserve_kv_transfer_exposed_seconds", S, "format", (0.5, 0.99)), "s"),
            panel("KV transfer failures/s by reason", [q(f"sum by (reason) (rate(stageserve_kv_transfer_failures_total{{{S}}}[{RI}]))", "{{reason}}")], "short"),
        ],
    },
    "fairness": {
        "title": "stageserve / Fairness",
        "panels": [
            panel("Admission decisions/s", [q(f"sum by (decision) (rate(stageserve_throttler_decisions_total[{RI}]))", "{{decision}}")], "reqps"),
            panel("Decisions/s by app", [q(f"sum by (app, decision) (rate(stageserve_throttler_decisions_total[{RI}]))", "{{app}} {{decision}}")], "reqps"),
            panel("Service gap (max counter gap among backlogged users)", [q("max(stageserve_throttler_service_gap_tokens)", "gap")], "short"),
            panel("Throttled interactions/s", [q(f"sum by (app) (rate(stageserve_throttler_throttled_interactions_total[{RI}]))", "{{app}}")], "short"),
            panel("Overloaded / queued / Redis degraded", [
                q("max(stageserve_throttler_overloaded)", "overloaded"),
                q("sum(stageserve_throttler_queued_requests)", "queued"),
                q("max(stageserve_throttler_redis_degraded)", "redis degraded"),
            ], "short"),
        ],
    },
    "encoder": {
        "title": "stageserve / Encoder",
        "panels": [
            panel("Pending image tokens", [q(f"sum by (instance) (stageserve_encoder_pending_image_tokens{{{S}}})", "{{instance}}")], "short"),
            panel("Image tokens encoded/s", [q(f"sum(rate(stageserve_encoder_image_tokens_total{{{S}}}[{RI}]))", "image tokens")], "short"),
            panel("Encode latency", quantiles("stageserve_encoder_latency_seconds", S), "s"),
        ],
    },
}  # fmt: skip


def variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "hide": 0,
        "sort": 1,
    }


def build(uid: str, spec: dict[str, Any]) -> dict[str, Any]:
    panels = []
    for i, p in enumerate(spec["panels"]):
        targets = [{**t, "refId": chr(ord("A") + j), "datasource": DS} for j, t in enumerate(p["targets"])]
        panels.append(
            {
                "id": i + 1,
                "title": p["title"],
                "type": p["type"],
                "datasource": DS,
                "targets": targets,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
            }
        )
    templating = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "hide": 0},
        variable("model_name", "label_values(vllm:num_requests_running, model_name)"),
        variable("stage", "label_values(stageserve_stage_info, stage)"),
    ]
    return {
        "uid": f"stageserve-{uid}",
        "title": spec["title"],
        "tags": ["stageserve"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {"list": templating},
        "panels": panels,
    }


def main(out_dir: str = "deploy/grafana") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for uid, spec in DASHBOARDS.items():
        (out / f"{uid}.json").write_text(json.dumps(build(uid, spec), indent=2) + "\n")
        print(f"wrote {out / f'{uid}.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
