"""Pure stage address logic and the re-resolve schedule of serving/common/discovery.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from stageserve.serving.common.config import ConfigError, load_config
from stageserve.serving.common.discovery import Discovery, pick_stable, resolve_dns, stage_addresses


def test_default_is_host_port_plus_ten_per_replica_as_stageserve_up_starts_them():
    config = load_config(overrides={"host": "127.0.0.1", "decode": {"replicas": 3}})
    assert stage_addresses(config, "decode") == ["127.0.0.1:50055", "127.0.0.1:50065", "127.0.0.1:50075"]
    assert stage_addresses(config, "decode") == config.addresses("decode")


def test_explicit_endpoints_win_over_host_and_replicas():
    config = load_config(overrides={"prefill": {"replicas": 4, "endpoints": ["10.0.0.5:7000", "node-b:7001"]}})
    assert stage_addresses(config, "prefill") == ["10.0.0.5:7000", "node-b:7001"]
    assert stage_addresses(config, "decode") == ["127.0.0.1:50055"]


def test_dns_answers_become_sorted_unique_addresses_on_the_stage_port():
    config = load_config(overrides={"decode": {"discovery": "dns", "service": "llm-decode.ml.svc", "port": 6000}})
    ips = ["10.1.0.9", "10.1.0.2", "10.1.0.9", "fd00::1"]
    assert stage_addresses(config, "decode", ips) == ["10.1.0.2:6000", "10.1.0.9:6000", "[fd00::1]:6000"]
    assert stage_addresses(config, "decode", []) == []  # no ready pod: nothing to route to (503), not localhost


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"discovery": "consul"}, "decode.discovery: must be static or dns"),
        ({"discovery": "dns"}, "decode.service: required"),
        ({"endpoints": ["10.0.0.1"]}, "decode.endpoints[0]: expected host:port"),
        ({"endpoints": ["10.0.0.1:99999"]}, "decode.endpoints[0]: expected host:port"),
    ],
)
def test_bad_discovery_config_names_the_field(section, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(overrides={"decode": section})


def test_pick_stable_keeps_the_current_throttler_while_it_is_listed():
    assert pick_stable("a:1", ["b:1", "a:1"]) == "a:1"
    assert pick_stable("a:1", ["c:1", "b:1"]) == "c:1"
    assert pick_stable(None, []) is None


def test_discovery_re_resolves_on_schedule_reports_changes_and_keeps_the_last_set_on_lookup_failure():
    answers: list[object] = [["10.0.0.1"], ["10.0.0.1"], ["10.0.0.1", "10.0.0.2"], OSError("NXDOMAIN"), []]
    asked: list[str] = []

    async def resolver(name: str) -> list[str]:
        asked.append(name)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    config = load_config(overrides={"gateway": {"discovery_interval_s": 5.0},
                                    "prefill": {"discovery": "dns", "service": "p.ns.svc"}})
    d = Discovery(config, resolver)
    assert d.dynamic == ("prefill",) and d.addresses("prefill") == []
    assert d.addresses("decode") == ["127.0.0.1:50055"]  # static stages stay as configured

    async def run() -> list[dict[str, list[str]]]:
        return [await d.poll(t) for t in (0.0, 1.0, 5.0, 10.0, 15.0, 20.0)]

    results = asyncio.run(run())
    assert results == [
        {"prefill": ["10.0.0.1:50054"]},  # first lookup
        {},  # t=1: not due
        {},  # t=5: same answer
        {"prefill": ["10.0.0.1:50054", "10.0.0.2:50054"]},  # a replica appeared
        {},  # t=15: lookup failed -> last known set kept
        {"prefill": []},  # t=20: the Service has no ready pod any more
    ]
    assert asked == ["p.ns.svc"] * 5


def test_static_only_config_never_resolves():
    d = Discovery(load_config(), resolver=None)  # type: ignore[arg-type]
    assert not d.due(0.0) and asyncio.run(d.poll(0.0)) == {}


def test_resolve_dns_uses_the_system_resolver():
    assert asyncio.run(resolve_dns("localhost")) and "127.0.0.1" in asyncio.run(resolve_dns("127.0.0.1"))
    with pytest.raises(socket.gaierror):
        asyncio.run(resolve_dns("no-such-service.invalid"))
