"""The dashboards and rules of deploy/ against a real Prometheus scraping the running pipeline.

The test starts Debian's ``prometheus`` on a free port with a generated config (scrape interval 1 s) that
scrapes every stage's metrics endpoint and loads ``deploy/prometheus/rules.yml``, sends traffic through the
gateway, then asks Prometheus' HTTP API whether every series that a panel or a rule reads exists and has data,
and whether every panel's PromQL is accepted. ``promtool`` checks the rules and both configs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
GRAFANA_VARS = {"$__rate_interval": "30s", "${model_name}": ".*", "$model_name": ".*", "${stage}": ".*", "$stage": ".*"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan",
}  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")


def metric_names(expr: str) -> set[str]:
    """The metric (or recorded series) names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        name, rest = match.group(0), expr[match.end() :].lstrip()
        before = expr[: match.start()]
        if rest.startswith("(") or name.lower() in PROMQL_WORDS or re.search(r"[0-9.]$", before):
            continue  # a function, an aggregation, a keyword or the exponent of a number (1e-9)
        names.add(name)
    return names


def panel_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [(r.get("record") or r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_metric_names_parser():
    assert metric_names('histogram_quantile(0.99, sum by (le, stage) (rate(vllm:ttft_bucket{a="x{y}"}[5m])))') == {
        "vllm:ttft_bucket"
    }
    assert metric_names("sum(rate(a_total[1m])) / clamp_min(sum(rate(b_total[1m])), 1e-9) or c == 0") == {
        "a_total", "b_total", "c",
    }  # fmt: skip


def test_dashboards_have_the_fields_grafana_requires():
    assert {p.stem for p in DASHBOARDS} >= {"overview", "stages", "kv-transfer", "fairness", "encoder"}
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
            assert key in d, f"{path.name}: missing {key}"
        assert d["uid"] not in uids and len(d["uid"]) <= 40
        uids.add(d["uid"])
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert {"datasource", "model_name", "stage"} <= set(variables), path.name
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for p in d["panels"]:
            assert p["type"] and p["title"] and p["targets"], f"{path.name}: {p.get('title')}"
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            assert p["datasource"]["type"] == "prometheus"
            assert all(t["refId"] and t["expr"] and t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_promtool_accepts_rules_and_example_config():
    for args in (["check", "rules", "rules.yml"], ["check", "config", "prometheus.yml"]):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(pipeline, tmp_path_factory):
    """A real Prometheus (1 s scrapes, the rules of deploy/ evaluated every second) scraping the pipeline."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (work / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    static = []
    for stage, urls in pipeline.metrics.items():
        for url in urls:
            parts = urlsplit(url)
            static.append({"targets": [parts.netloc], "labels": {"stage": stage}})
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "stageserve-test", "honor_labels": True, "static_configs": static}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    check = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=work, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = _free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (work / "prometheus.log").read_text()[-2000:]
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(url: str, expr: str) -> dict:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]


def _wait_for(url: str, expr: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not _query(url, expr)["result"]:
        assert time.monotonic() < deadline, f"no data for {expr} after {timeout_s:.0f} s"
        time.sleep(0.5)


def _traffic(pipeline) -> None:
    base = pipeline.openai_base_url
    with httpx.Client(timeout=120) as client:
        for i in range(3):
            body = {"messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 6, "stream": i == 1}
            r = client.post(f"{base}/chat/completions", json=body, headers={"x-stageserve-app": f"app-{i % 2}"})
            assert r.status_code == 200, r.text
        r = client.post(f"{base}/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert client.post(f"{base}/chat/completions", json={"messages": []}).status_code == 400


def test_every_panel_and_rule_reads_live_series(pipeline, prometheus):
    _wait_for(prometheus, 'up{job="stageserve-test"} == 1')
    _traffic(pipeline)
    # Two scrapes after the traffic, so rate() over the panels' window sees it, then a rule evaluation.
    _wait_for(prometheus, "sum(rate(vllm:generation_tokens_total[30s])) > 0")
    _wait_for(prometheus, 'sum(rate(stageserve_gateway_requests_total{code="200"}[30s])) > 0')
    _wait_for(prometheus, "stageserve:gateway_ttft_slo_attainment:ratio_5m")
    _wait_for(prometheus, "stageserve:kv_transfer_compression:ratio_5m")

    names: dict[str, str] = {}
    for dashboard, title, expr in panel_exprs():
        _query(prometheus, substitute(expr))  # accepted by Prometheus
        names.update({n: f"{dashboard}: {title}" for n in metric_names(expr)})
    for rule, expr in rule_exprs():
        _query(prometheus, expr)
        names.update({n: f"rule {rule}" for n in metric_names(expr)})
    missing = [f"{n} ({where})" for n, where in sorted(names.items()) if not _query(prometheus, n)["result"]]
    assert not missing, f"series without data: {missing}"
    targets = _query(prometheus, 'up{job="stageserve-test"}')["result"]
    assert {t["metric"]["stage"]: t["value"][1] for t in targets} == {stage: "1" for stage in pipeline.metrics}

    # The values are the traffic's: 4 successful requests, 1 bad one, tokens generated, KV moved and compressed.
    ok = _query(prometheus, 'sum(stageserve_gateway_requests_total{code="200"})')["result"]
    assert float(ok[0]["value"][1]) >= 4
    bad = _query(prometheus, 'sum(stageserve_gateway_requests_total{code="400"})')["result"]
    assert float(bad[0]["value"][1]) >= 1
    kv = _query(prometheus, "sum(stageserve_kv_transfer_bytes_total)")["result"]
    assert float(kv[0]["value"][1]) > 0
    replicas = _query(prometheus, "stageserve:stage_replicas:count")["result"]
    assert {r["metric"]["stage"]: r["value"][1] for r in replicas} == {s: "1" for s in pipeline.metrics}
