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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings
from notifier.ui.routes import SignInRequired, router

__all__ = ["install", "session_secret"]

COOKIE = "notifier_ui"


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


class _PageHeaders:
    """Security headers of every ``/ui`` response: no page may be framed by another site
    (clickjacking), and the session cookie is ``Secure`` whenever the page came over https
    (directly, or through a proxy uvicorn trusts), while plain http on 127.0.0.1 still works."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/ui"):
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message.get("headers", []):
                    if (https and name.lower() == b"set-cookie"
                            and value.startswith(COOKIE.encode() + b"=")
                            and b"secure" not in value.lower()):
                        value += b"; secure"
                    headers.append((name, value))
                headers += [(b"content-security-policy", b"frame-ancestors 'none'"),
                            (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: FastAPI) -> None:
    """Mount the UI on ``app`` (after ``app.state.services`` is set): its routes, static files,
    the signed session cookie and the pages' security headers."""
    settings: Settings = app.state.services.settings
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="ui-static")
    # The cookie is scoped to /ui, so API calls never carry it; SameSite=Lax keeps other
    # sites' forms from posting with it. It only names a server-side session (notifier.ui.
    # sessions), which is what the lifetimes, sign-out and key revocation act on.
    app.add_middleware(SessionMiddleware, secret_key=session_secret(settings),
                       session_cookie=COOKIE, max_age=int(settings.ui_session_max_seconds),
                       path="/ui", same_site="lax")
    app.add_middleware(_PageHeaders)  # outside the session's, so it sees its Set-Cookie

    async def sign_in(_request: Request, _exc: Exception) -> RedirectResponse:
        return RedirectResponse("/ui/login", status_code=303)

    app.add_exception_handler(SignInRequired, sign_in)
