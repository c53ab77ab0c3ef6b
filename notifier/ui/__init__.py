"""The admin web UI (``/ui``): server-rendered pages, one CSS file, a little plain JavaScript."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from config import Settings
from notifier.ui.routes import SignInRequired, router

__all__ = ["install", "session_secret"]

SESSION_SECONDS = 8 * 3600


def session_secret(settings: Settings) -> str:
    """The key signing the UI's session cookie, derived from the vault's first key.

    Deriving it (rather than adding a setting) keeps every web process of one install on the
    same key with nothing new to configure, and rotating the vault keys signs everyone out.
    """
    key_file = settings.data_dir / "secret.key"  # the embedded default's vault key
    if settings.secret_keys:
        key = settings.secret_keys[0]
    elif key_file.exists():
        key = key_file.read_text().strip()
    else:  # services built without the key file (tests): sessions last as long as the process
        key = secrets.token_urlsafe(32)
    return hmac.new(key.encode(), b"notifier admin ui session", hashlib.sha256).hexdigest()


def install(app: FastAPI) -> None:
    """Mount the UI on ``app`` (after ``app.state.services`` is set): its routes, static files
    and the signed session cookie."""
    settings: Settings = app.state.services.settings
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="ui-static")
    # The cookie is scoped to /ui, so API calls never carry it; SameSite=Lax keeps other
    # sites' forms from posting with it.
    app.add_middleware(SessionMiddleware, secret_key=session_secret(settings),
                       session_cookie="notifier_ui", max_age=SESSION_SECONDS, path="/ui",
                       same_site="lax")

    async def sign_in(_request: Request, _exc: Exception) -> RedirectResponse:
        return RedirectResponse("/ui/login", status_code=303)

    app.add_exception_handler(SignInRequired, sign_in)
