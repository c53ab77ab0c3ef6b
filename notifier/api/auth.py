"""Who is calling: ``Authorization: Bearer <key>`` or HTTP Basic ``<orgId>:<key>``."""

from __future__ import annotations

import base64
import binascii

from fastapi import Request

from notifier import tenants
from notifier.errors import AuthenticationFailed

__all__ = ["caller_key", "caller_org"]


def caller_org(request: Request) -> int:
    """The org of the request's API key (a FastAPI dependency); the key itself is
    ``caller_key(request)``, for what records who asked."""
    org_id, key_id = _caller(request)
    request.state.api_key_id = key_id
    return org_id


def caller_key(request: Request) -> str:
    """Who called, as a record of it names them (once ``caller_org`` has authenticated it)."""
    return f"api key {request.state.api_key_id}"


def _caller(request: Request) -> tuple[int, int]:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    services = request.app.state.services
    if scheme.lower() == "bearer" and credentials.strip():
        return tenants.authenticate_key(services.db, credentials.strip())
    if scheme.lower() == "basic" and credentials.strip():
        try:
            user, _, key = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            org_id = int(user)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthenticationFailed("Basic credentials must be <orgId>:<API key>") from None
        return tenants.authenticate_key(services.db, key, org_id=org_id)
    raise AuthenticationFailed("send an API key: Authorization: Bearer <key>")
