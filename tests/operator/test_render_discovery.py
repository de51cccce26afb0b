"""The rendered per-stage config wires Kubernetes discovery: headless Services and `discovery: dns` the gateway's
serving config accepts."""

from __future__ import annotations

import yaml

from stageserve.serving.common.config import load_config
from stageserve.serving.common.discovery import stage_addresses
from stageserve_operator.render import render
from stageserve_operator.spec import parse_spec

SPEC = {"model": "/models/m.gguf", "stages": {"decode": {"replicas": 3}}}
REPLICAS = {"gateway": 1, "throttler": 1, "encoder": 1, "prefill": 1, "decode": 3}


def _objs():
    return render("llm", "serving", "uid-1", parse_spec(SPEC), REPLICAS)


def test_stage_services_behind_the_gateway_are_headless_and_the_gateway_one_is_not():
    services = {o["metadata"]["name"]: o["spec"] for o in _objs() if o["kind"] == "Service"}
    for stage in ("throttler", "encoder", "prefill", "decode"):
        assert services[f"llm-{stage}"]["clusterIP"] == "None"
    assert "clusterIP" not in services["llm-gateway"]  # clients get one virtual IP


def test_gateway_config_map_loads_as_serving_config_with_dns_discovery(tmp_path):
    cm = next(o for o in _objs() if o["metadata"]["name"] == "llm-gateway-config")
    path = tmp_path / "stageserve.yaml"
    path.write_text(cm["data"]["stageserve.yaml"])
    config = load_config(str(path))
    assert config.decode.discovery == "dns" and config.decode.service == "llm-decode.serving.svc"
    assert config.throttler.service == "llm-throttler.serving.svc" and config.throttler.port == 50052
    # three decode pods behind the headless Service -> three gateway targets on the decode port
    ips = ["10.0.1.7", "10.0.0.3", "10.0.2.9"]
    assert stage_addresses(config, "decode", ips) == ["10.0.0.3:50055", "10.0.1.7:50055", "10.0.2.9:50055"]
    assert yaml.safe_load(cm["data"]["stageserve.yaml"])["host"] == "0.0.0.0"
