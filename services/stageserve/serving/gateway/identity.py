"""Per-tenant API keys: `Authorization: Bearer <key>` -> tenant, and a key may not act as another tenant.

`gateway.api_keys` maps the SHA-256 hex digest of each key to its tenant, `{user: U, app: A}` (app
optional: a key without one may name any app). With no keys configured, identity comes from the
`x-stageserve-*` headers / metadata alone. With keys: no or unknown key -> 401; a header naming another
user (or, for an app-bound key, another app) -> 403; the OpenAI body `user` field is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping

from stageserve.serving.common.errors import PermissionDenied, Unauthenticated
from stageserve.serving.gateway.http import APP_HEADER, USER_HEADER, TenantHeaders


@dataclasses.dataclass(frozen=True)
class KeyTenant:
    user: str
    app: str | None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, table: Mapping[str, object]) -> None:
        self.table: dict[str, KeyTenant] = {}
        for digest, tenant in table.items():
            if not isinstance(tenant, Mapping) or not isinstance(tenant.get("user"), str):
                raise ValueError(f"gateway.api_keys.{digest}: expected {{user: NAME, app: NAME (optional)}}")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"gateway.api_keys: {digest!r} is not a SHA-256 hex digest")
            self.table[digest.lower()] = KeyTenant(tenant["user"], tenant.get("app"))

    def __bool__(self) -> bool:
        return bool(self.table)

    def lookup(self, authorization: str | None) -> KeyTenant:
        if not authorization:
            raise Unauthenticated("authorization: an API key is required (Authorization: Bearer <key>)")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization: expected 'Bearer <key>'")
        digest = key_digest(key.strip())
        for known, tenant in self.table.items():
            if hmac.compare_digest(known, digest):
                return tenant
        raise Unauthenticated("authorization: unknown API key")

    def authorize(self, tenant: TenantHeaders, headers: Mapping[str, str], authorization: str | None) -> TenantHeaders:
        """The tenant the key stands for; claimed user/app headers must agree with it."""
        if not self.table:
            return tenant
        owner = self.lookup(authorization)
        claimed_user = headers.get(USER_HEADER)
        if claimed_user and claimed_user != owner.user:
            raise PermissionDenied(f"{USER_HEADER}: this API key belongs to user {owner.user!r}, not {claimed_user!r}")
        claimed_app = headers.get(APP_HEADER)
        if owner.app is not None and claimed_app and claimed_app != owner.app:
            raise PermissionDenied(f"{APP_HEADER}: this API key belongs to app {owner.app!r}, not {claimed_app!r}")
        app = owner.app or tenant.app
        return dataclasses.replace(tenant, user=owner.user, app=app)
