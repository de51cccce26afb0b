"""Per-tenant API keys: the key decides the tenant; claiming another one is refused."""

from __future__ import annotations

import pytest

from stageserve.serving.common.errors import PermissionDenied, Unauthenticated
from stageserve.serving.gateway.http import TenantHeaders
from stageserve.serving.gateway.identity import ApiKeys, key_digest

KEYS = ApiKeys({key_digest("k-alice"): {"user": "alice"}, key_digest("k-bot"): {"user": "bot", "app": "search"}})
ANON = TenantHeaders("anonymous", "default", "iid", 0)


def test_no_keys_configured_keeps_the_header_identity() -> None:
    assert ApiKeys({}).authorize(ANON, {}, None) == ANON


def test_key_sets_user_and_bound_app() -> None:
    assert KEYS.authorize(ANON, {}, "Bearer k-alice") == TenantHeaders("alice", "default", "iid", 0)
    claimed = TenantHeaders("alice", "notes", "iid", 2)
    assert KEYS.authorize(claimed, {"x-stageserve-user": "alice"}, "bearer k-alice") == claimed
    assert KEYS.authorize(ANON, {}, "Bearer k-bot").app == "search"


@pytest.mark.parametrize("auth", [None, "", "Basic abc", "Bearer ", "Bearer wrong"])
def test_missing_or_unknown_key_is_401(auth: str | None) -> None:
    with pytest.raises(Unauthenticated, match="authorization"):
        KEYS.authorize(ANON, {}, auth)


def test_claiming_another_tenant_is_403() -> None:
    with pytest.raises(PermissionDenied, match="x-stageserve-user"):
        KEYS.authorize(ANON, {"x-stageserve-user": "mallory"}, "Bearer k-alice")
    with pytest.raises(PermissionDenied, match="x-stageserve-app"):
        KEYS.authorize(ANON, {"x-stageserve-app": "notes"}, "Bearer k-bot")


def test_bad_table_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        ApiKeys({"not-a-digest": {"user": "x"}})
    with pytest.raises(ValueError, match="user"):
        ApiKeys({key_digest("k"): {"app": "x"}})
