"""API keys: user keys for /v1, a separate admin key for /admin, both compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from serving.errors import APIError

LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys) -> bool:
    # Compare against every key, so timing does not reveal which (or whether any) matched early.
    ok = False
    for key in keys:
        ok |= token is not None and hmac.compare_digest(token.encode(), key.encode())
    return ok


def require_user(request: Request, user_keys: set[str]) -> str:
    """The caller's identity for rate limiting: its key, or its address when keys are off."""
    if not user_keys:
        return request.client.host if request.client else "anonymous"
    token = bearer(request)
    if not _matches(token, user_keys):
        raise APIError(401, "missing or invalid API key", code="invalid_api_key")
    return token


def require_admin(request: Request, admin_key: str | None) -> None:
    if admin_key is None:
        # No admin key configured: admin routes answer only on loopback.
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            raise APIError(403, "admin API is loopback-only until an admin key is set (GUARDTUNE_ADMIN_KEY)",
                           code="admin_disabled")
        return
    if not _matches(bearer(request), [admin_key]):
        raise APIError(401, "missing or invalid admin key", code="invalid_admin_key")
