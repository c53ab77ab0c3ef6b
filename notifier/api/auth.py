"""Who is calling: ``Authorization: Bearer <key>`` or HTTP Basic ``<orgId>:<key>``."""

from __future__ import annotations

import base64
import binascii

from fastapi import Request

from notifier import tenants
from notifier.errors import AuthenticationFailed

__all__ = ["caller_org"]


def caller_org(request: Request) -> int:
    """The org of the request's API key (a FastAPI dependency)."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    services = request.app.state.services
    if scheme.lower() == "bearer" and credentials.strip():
        return tenants.authenticate(services.db, credentials.strip())
    if scheme.lower() == "basic" and credentials.strip():
        try:
            user, _, key = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            org_id = int(user)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthenticationFailed("Basic credentials must be <orgId>:<API key>") from None
        return tenants.authenticate(services.db, key, org_id=org_id)
    raise AuthenticationFailed("send an API key: Authorization: Bearer <key>")
