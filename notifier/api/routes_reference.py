"""``/v3/reference``: the reference data enrichment reads (tills, stores, customers, cards,
points balances, awarded references), one record at a time or in bulk as JSON lines."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from notifier import reference
from notifier.api.auth import caller_org
from notifier.api.envelope import envelope
from notifier.api.schemas import answers
from notifier.db import Database

__all__ = ["router"]

router = APIRouter(prefix="/v3/reference", tags=["reference"])
Org = Annotated[int, Depends(caller_org)]
JSON_LINES = {"content": {"application/x-ndjson": {"schema": {"type": "string"}},
                          "text/plain": {"schema": {"type": "string"}}}}


@router.post("", responses=answers(200, dict[str, int]), openapi_extra={"requestBody": JSON_LINES})
async def load_lines(request: Request, org: Org,
                     kind: Annotated[str | None, Query()] = None) -> JSONResponse:
    """Store JSON lines, each an object with its ``kind`` (or all of ``?kind=``): all or none.

    A bad line fails the whole body with a 400 that lists every bad line by number.
    """
    body = await request.body()  # at most NOTIFIER_MAX_BODY_BYTES (api.limits)
    # Parsing and loading take seconds for a large body: off the event loop, which would
    # otherwise hold every other request of this process meanwhile.
    counts = await run_in_threadpool(_load, request.app.state.services.db, org, body, kind)
    return envelope(counts)


def _load(db: Database, org: int, body: bytes, kind: str | None) -> dict[str, int]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = "\ufffd"  # not UTF-8: reported as the first line's problem below
    return reference.load(db, org, reference.parse_jsonl(text.splitlines(), kind=kind))


@router.put("/{kind}/{key}", responses=answers(200, dict[str, Any]))
def put_record(kind: str, key: str, org: Org, request: Request,
               body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """Store one record under ``key``, replacing what was there."""
    return envelope(reference.put_record(request.app.state.services.db, org, kind, key, body))


@router.get("/{kind}/{key}", responses=answers(200, dict[str, Any]))
def get_record(kind: str, key: str, org: Org, request: Request) -> JSONResponse:
    return envelope(reference.get_record(request.app.state.services.db, org, kind, key))


@router.delete("/{kind}/{key}", responses=answers(200, None))
def delete_record(kind: str, key: str, org: Org, request: Request) -> JSONResponse:
    reference.delete_record(request.app.state.services.db, org, kind, key)
    return envelope(None)
