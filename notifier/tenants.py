"""Orgs and their API keys. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select, update

from notifier.db import Database
from notifier.errors import AuthenticationFailed, NotFound
from notifier.models import ApiKey, Org

__all__ = ["KEY_PREFIX", "authenticate", "authenticate_key", "create_key", "list_keys",
           "revoke_key"]

KEY_PREFIX = "nk_"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Database, org_id: int, *, now_ms: int) -> str:
    """A new API key for the org; returned once, kept only as a hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.session() as session:
        if session.get(Org, org_id) is None:
            raise NotFound(f"org {org_id} does not exist")
        session.add(ApiKey(org_id=org_id, prefix=key[:10], key_hash=_digest(key),
                           created_at_ms=now_ms))
    return key


def list_keys(db: Database, org_id: int) -> list[tuple[str, int, int | None]]:
    """(prefix, created, revoked) of every key of the org."""
    with db.session() as session:
        rows = session.execute(select(ApiKey.prefix, ApiKey.created_at_ms, ApiKey.revoked_at_ms)
                               .where(ApiKey.org_id == org_id).order_by(ApiKey.id)).all()
    return [(r[0], r[1], r[2]) for r in rows]


def revoke_key(db: Database, org_id: int, prefix: str, *, now_ms: int) -> int:
    """Revoke the org's live keys starting with ``prefix``; returns how many."""
    if len(prefix) < 6:
        raise NotFound("give at least the first 6 characters of the key")
    with db.session() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.org_id == org_id, ApiKey.prefix.startswith(prefix[:10]),
                   ApiKey.revoked_at_ms.is_(None))
            .values(revoked_at_ms=now_ms))
        count = int(getattr(result, "rowcount", 0) or 0)
    if not count:
        raise NotFound(f"no live key of org {org_id} starts with {prefix!r}")
    return count


def authenticate(db: Database, key: str, *, org_id: int | None = None) -> int:
    """The org a live key belongs to; with ``org_id`` (HTTP Basic), it must be that org's."""
    return authenticate_key(db, key, org_id=org_id)[0]


def authenticate_key(db: Database, key: str, *, org_id: int | None = None) -> tuple[int, int]:
    """(org, key id) of a live key: what a UI session is bound to. See ``authenticate``."""
    with db.session() as session:
        row = session.execute(select(ApiKey.org_id, ApiKey.id, ApiKey.revoked_at_ms)
                              .where(ApiKey.key_hash == _digest(key))).first()
    if row is None or row.revoked_at_ms is not None or (org_id is not None and row.org_id != org_id):
        raise AuthenticationFailed("invalid or revoked API key")
    return int(row.org_id), int(row.id)
