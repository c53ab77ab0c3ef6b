"""The request body limit (``NOTIFIER_MAX_BODY_BYTES``), held before any handler reads a byte."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from notifier.api.envelope import envelope, error_body

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 without being read whole.

    A declared ``Content-Length`` over the limit is refused before a byte is read. A body
    without one (chunked) is read here in the server's pieces, counting, and refused as soon as
    the count passes the limit; one within it is handed to the application as it came. So no
    handler ever holds more than ``limit`` bytes of a body, whatever the client sends.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        if declared is not None and declared <= self.limit:
            # The server delivers no more than the declared length: nothing left to count.
            await self.app(scope, receive, send)
            return
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                await self.app(scope, _replay([], message, receive), send)
                return
            piece = message.get("body", b"")
            size += len(piece)
            if size > self.limit:
                await self._refuse(scope, receive, send, f"more than {self.limit} bytes")
                return
            pieces.append(piece)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(pieces, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        response = envelope(None, status=413, errors=[error_body(
            "TOO_LARGE", f"body: {size}, over the limit of {self.limit} bytes "
                         "(NOTIFIER_MAX_BODY_BYTES)", "body")])
        # The connection is closed after the answer: what the client still sends is not read.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


def _replay(pieces: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read already as one message, then the real one's."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            if last is not None:
                return last
            return {"type": "http.request", "body": b"".join(pieces), "more_body": False}
        return await receive()

    return replay
