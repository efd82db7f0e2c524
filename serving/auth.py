"""API keys: user keys for /v1, a separate admin key for /admin, any key (or an ops key) for the ops pages.

Keys are compared in constant time. The ops pages also take HTTP Basic credentials (the key as the
password), so a browser can open the dashboard: it asks once, then sends them on the page's own fetches.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from fastapi import Request

from serving.errors import APIError

LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}
# A request that carries any of these came through a proxy: its socket peer says nothing about the client.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")
OPS_REALM = 'Basic realm="guardtune ops", charset="UTF-8"'


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def basic_password(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return password if sep and password else None


def _matches(token: str | None, keys) -> bool:
    # Compare against every key, so timing does not reveal which (or whether any) matched early.
    ok = False
    for key in keys:
        ok |= token is not None and hmac.compare_digest(token.encode(), key.encode())
    return ok


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (sessions are scoped by it; audit records carry it)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def require_user(request: Request, user_keys: set[str]) -> str:
    """The caller's identity for rate limiting: its key, or its address when keys are off."""
    if not user_keys:
        return request.client.host if request.client else "anonymous"
    token = bearer(request)
    if not _matches(token, user_keys):
        raise APIError(401, "missing or invalid API key", code="invalid_api_key")
    return token


def require_ops(request: Request, readers: set[str]) -> None:
    """Any configured key opens /metrics and /dashboard; with no keys at all they are open."""
    if not readers:
        return
    if not _matches(bearer(request) or basic_password(request), readers):
        raise APIError(401, "missing or invalid key (any API key, the ops key or the admin key)",
                       code="invalid_api_key", headers={"WWW-Authenticate": OPS_REALM})


def direct_loopback(request: Request) -> bool:
    """The socket peer is this machine and no proxy stands between (a local proxy is loopback too)."""
    host = request.client.host if request.client else ""
    return host in LOOPBACK and not any(h in request.headers for h in FORWARDING_HEADERS)


def require_admin(request: Request, admin_key: str | None) -> None:
    if admin_key is None:
        # No admin key configured: admin routes answer only to direct loopback callers.
        if not direct_loopback(request):
            raise APIError(403, "admin API is loopback-only until an admin key is set (GUARDTUNE_ADMIN_KEY)",
                           code="admin_disabled")
        return
    if not _matches(bearer(request), [admin_key]):
        raise APIError(401, "missing or invalid admin key", code="invalid_admin_key")
