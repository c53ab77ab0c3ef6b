"""The API's answer to a dependency that is away: 503 with the class's public message; the
driver's words (hosts, ports, server states) go to the log only."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from notifier.api.envelope import install_error_handlers
from notifier.errors import QueueUnavailable, StoreRefused, StoreUnavailable, TransientError

CAUSE = 'connection to server at "10.1.2.3", port 6543 failed: timeout expired'


@pytest.mark.parametrize("kind", [StoreUnavailable, QueueUnavailable, TransientError])
def test_a_transient_error_answers_503_with_its_public_message_and_logs_its_cause(
        kind: type[TransientError], caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/away")
    def away() -> None:
        raise kind(CAUSE)

    with caplog.at_level(logging.WARNING, logger="notifier.api.envelope"):
        answer = TestClient(app).get("/away")
    assert answer.status_code == 503
    assert answer.json()["errors"] == [{"code": "UNAVAILABLE", "message": kind.public}]
    assert CAUSE not in answer.text and "10.1.2.3" not in answer.text
    assert any(CAUSE in record.getMessage() for record in caplog.records)


def test_a_statement_the_database_refused_answers_500_without_its_words(
        caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    install_error_handlers(app)
    refused = ('database refused (SQLSTATE 23514): new row for relation "webhooks" violates '
               'check constraint "x"\nDETAIL: Failing row contains (secret@example.com)')

    @app.get("/refused")
    def refused_route() -> None:
        raise StoreRefused(refused)

    with caplog.at_level(logging.ERROR, logger="notifier.api.envelope"):
        answer = TestClient(app).get("/refused")
    assert answer.status_code == 500
    assert answer.json()["errors"][0]["code"] == "INTERNAL"
    assert "webhooks" not in answer.text and "secret@example.com" not in answer.text
    # The log names the kind of failure, not the values the database quoted.
    assert any("StoreRefused" in r.getMessage() for r in caplog.records)
    assert not any("secret@example.com" in r.getMessage() for r in caplog.records)
