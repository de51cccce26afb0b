"""The Prometheus HTTP API (``/api/v1/query``): reads the series the autoscaler needs."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from stageserve_operator import metrics
from stageserve_operator.policy.autoscale import StageLoad


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or rejected a query; the message has the query and the reason."""


class Prometheus:
    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def query(self, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """Runs an instant query; returns (labels, value) per series of the resulting vector."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.base_url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with self._opener.open(url, timeout=self.timeout_s) as reply:
                body: dict[str, Any] = json.load(reply)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise PrometheusError(f"query {expr!r}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PrometheusError(f"query {expr!r}: {exc}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def scalar(self, expr: str) -> float | None:
        rows = self.query(expr)
        return rows[0][1] if rows else None

    def stage_load(self, stage: str, window: str, slo_s: float, deployment: str | None = None) -> StageLoad:
        """The load of ``stage`` over the last ``window`` (a PromQL duration such as ``2m``)."""
        values = {name: self.scalar(q) for name, q in metrics.stage_queries(stage, window, deployment).items()}
        hist = metrics.slo_histogram_query(stage, window, deployment)
        attained = None
        if hist is not None:
            buckets = {float(labels["le"]): v for labels, v in self.query(hist) if "le" in labels}
            attained = metrics.attainment(buckets, slo_s)
        return metrics.load_from_samples(values, attained)

    def ready(self) -> bool:
        try:
            with self._opener.open(f"{self.base_url}/-/ready", timeout=self.timeout_s) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False
