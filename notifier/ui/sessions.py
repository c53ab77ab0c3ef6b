"""Sessions of the admin pages, kept server-side and bound to the API key they were signed in
with: each request checks the session is open, the key still live, and neither the idle nor
the absolute lifetime (``NOTIFIER_UI_SESSION_IDLE_SECONDS``, ``..._MAX_SECONDS``) is past.

The signed cookie only names its session, so a saved copy is worth nothing once the session is
ended (sign-out), its key revoked, or its time up.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import delete, or_, select, update

from notifier.db import Database
from notifier.errors import AuthenticationFailed
from notifier.models import ApiKey, UiSession

__all__ = ["check", "end", "start"]

# last_seen is written at most this often (or every half idle lifetime, if that is shorter):
# a page view is a read, not a write, and a minute of slack in an idle lifetime of hours
# costs nothing.
_TOUCH_MS = 60_000


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def start(db: Database, org_id: int, api_key_id: int, *, now_ms: int, max_ms: int) -> str:
    """Open a session of ``org_id`` signed in with key ``api_key_id``; returns its id (for the
    cookie; only its hash is stored). The org's sessions that are over are cleared away."""
    session_id = secrets.token_urlsafe(32)
    with db.session() as session:
        session.execute(delete(UiSession).where(
            UiSession.org_id == org_id,
            or_(UiSession.ended_at_ms.is_not(None), UiSession.created_at_ms <= now_ms - max_ms)))
        session.add(UiSession(id=_digest(session_id), org_id=org_id, api_key_id=api_key_id,
                              created_at_ms=now_ms, last_seen_at_ms=now_ms))
    return session_id


def check(db: Database, session_id: str, *, now_ms: int, idle_ms: int, max_ms: int) -> int:
    """The org of a session that is still good; ``AuthenticationFailed`` saying why if not."""
    digest = _digest(session_id)
    with db.session() as session:
        row = session.execute(
            select(UiSession.org_id, UiSession.created_at_ms, UiSession.last_seen_at_ms,
                   UiSession.ended_at_ms, ApiKey.revoked_at_ms)
            .join(ApiKey, ApiKey.id == UiSession.api_key_id)
            .where(UiSession.id == digest)).first()
        if row is None or row.ended_at_ms is not None:
            raise AuthenticationFailed("the session was signed out")
        if row.revoked_at_ms is not None:
            raise AuthenticationFailed("the API key the session was signed in with is revoked")
        if now_ms - row.created_at_ms >= max_ms:
            raise AuthenticationFailed("the session is past its absolute lifetime")
        if now_ms - row.last_seen_at_ms >= idle_ms:
            raise AuthenticationFailed("the session was idle too long")
        if now_ms - row.last_seen_at_ms >= min(_TOUCH_MS, idle_ms // 2):
            session.execute(update(UiSession).where(UiSession.id == digest)
                            .values(last_seen_at_ms=now_ms))
    return int(row.org_id)


def end(db: Database, session_id: str, *, now_ms: int) -> None:
    """Sign a session out: its cookie, wherever it was saved, is refused from now on."""
    with db.session() as session:
        session.execute(update(UiSession)
                        .where(UiSession.id == _digest(session_id), UiSession.ended_at_ms.is_(None))
                        .values(ended_at_ms=now_ms))
