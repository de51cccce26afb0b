"""Renders Grafana panels of ``deploy/grafana/`` from a real Prometheus with matplotlib (no Grafana needed).

    # against a Prometheus that scrapes a running pipeline:
    python tools/render_panels.py --prometheus http://127.0.0.1:9090 --dashboard deploy/grafana/overview.json \\
        --minutes 10 --out 'docs/img/{name}.png'

    # or the whole loop on this machine: `stageserve up` on free ports, a Prometheus scraping it every second,
    # mixed traffic (two apps, several KV formats) for --minutes, then the PNG:
    python tools/render_panels.py --demo --minutes 3 --dashboard deploy/grafana/overview.json \\
        --dashboard deploy/grafana/kv-transfer.json

Each panel's PromQL is the dashboard's own, with Grafana's variables replaced ($model_name, $stage: all;
$__rate_interval: --rate-interval).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def substitute(expr: str, rate_interval: str) -> str:
    for var, value in (("$__rate_interval", rate_interval), ("${model_name}", ".*"), ("$model_name", ".*"),
                       ("${stage}", ".*"), ("$stage", ".*")):  # fmt: skip
        expr = expr.replace(var, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or str(labels)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{prometheus}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30
    )
    body = r.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def render(
    prometheus: str, dashboard: Path, out: Path, minutes: float, titles: list[str] | None, rate_interval: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = json.loads(dashboard.read_text())
    panels = [p for p in spec["panels"] if not titles or p["title"] in titles]
    if not panels:
        raise SystemExit(f"no panel of {dashboard} matches {titles}")
    end = time.time()
    start = end - 60 * minutes
    step = max(1.0, 60 * minutes / 240)
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in query_range(prometheus, substitute(target["expr"], rate_interval), start, end, step):
                ts = [float(t) - start for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                if all(v != v for v in vs):  # only NaN (e.g. a quantile of a format that carried no traffic)
                    continue
                ax.plot(ts, vs, label=legend(target.get("legendFormat", ""), series["metric"]), linewidth=1.3)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{spec['title']} (rendered from Prometheus query_range, local run)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def render_all(prometheus: str, args: argparse.Namespace) -> None:
    for dashboard in args.dashboard:
        out = Path(args.out.format(name=dashboard.stem))
        render(prometheus, dashboard, out, args.minutes, args.panel, args.rate_interval)


# ---- --demo: a local pipeline, a Prometheus and traffic ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_prometheus(endpoints: Any, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (work / "rules.yml").write_text(yaml.safe_dump(rules))
    static = [
        {"targets": [url.split("/")[2]], "labels": {"stage": stage}}
        for stage, urls in endpoints.metrics.items()
        for url in urls
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "stageserve-demo", "honor_labels": True, "static_configs": static}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("prometheus did not become ready")


def _traffic(base_url: str, seconds: float, clients: int = 2) -> None:
    formats = ("hack2", "fp8", "bf16", "hack-k4v2")
    prompts = ("Write a haiku about rivers.", "List three prime numbers.", "What is a GPU?", "Say hello in French.")
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        n = 0
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                headers = {"x-stageserve-app": f"app-{i}", "x-stageserve-kv-format": formats[n % len(formats)]}
                body = {"messages": [{"role": "user", "content": prompts[n % len(prompts)]}],
                        "max_tokens": 8 + 8 * (n % 3), "stream": n % 2 == 0}  # fmt: skip
                http.post(f"{base_url}/chat/completions", json=body, headers=headers)
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def demo(args: argparse.Namespace) -> None:
    from stageserve.serving.supervisor import Supervisor, free_port_config

    if shutil.which("prometheus") is None:
        raise SystemExit("--demo needs the prometheus binary (apt install prometheus)")
    work = Path(tempfile.mkdtemp(prefix="stageserve-render-"))
    supervisor = Supervisor(free_port_config(), log_dir=work / "logs")
    endpoints = supervisor.start()
    prometheus = None
    try:
        prometheus, url = _start_prometheus(endpoints, work)
        print(f"pipeline up; prometheus {url}; sending traffic for {args.minutes} min", flush=True)
        _traffic(endpoints.openai_base_url, 60 * args.minutes)
        time.sleep(3)
        render_all(url, args)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        supervisor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", help="Prometheus base URL (not with --demo)")
    parser.add_argument("--dashboard", type=Path, action="append", help="dashboard JSON (repeat; default: overview)")
    parser.add_argument("--panel", action="append", help="panel title to render (repeat; default: all)")
    parser.add_argument("--minutes", type=float, default=5.0, help="time range (with --demo: traffic duration)")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval becomes")
    parser.add_argument("--out", default=str(ROOT / "docs/img/{name}.png"), help="PNG path; {name}: dashboard")
    parser.add_argument("--demo", action="store_true", help="start a local pipeline + Prometheus + traffic first")
    args = parser.parse_args(argv)
    args.dashboard = args.dashboard or [ROOT / "deploy/grafana/overview.json"]
    if args.demo:
        demo(args)
    elif args.prometheus:
        render_all(args.prometheus, args)
    else:
        parser.error("--prometheus URL or --demo is required")


if __name__ == "__main__":
    main(sys.argv[1:])
