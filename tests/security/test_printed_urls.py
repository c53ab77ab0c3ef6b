"""What the ``notifier`` command prints never shows a password of the URLs it was given."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from notifier.cli import main
from notifier.vault import mask_url

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_db_upgrade_prints_the_database_url_without_its_password(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test database trusts 127.0.0.1, so the password is accepted, unchecked.
    with_password = pg_url.replace("://postgres@", "://postgres:s3cret-pw@")
    assert with_password != pg_url
    monkeypatch.setenv("NOTIFIER_DATABASE_URL", with_password)
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert "postgres:***@" in result.output


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://app:hunter2@db:5432/notifier", "postgresql+psycopg://app:***@db:5432/notifier"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("amqp://guest:p%40ss@rabbit//", "amqp://guest:***@rabbit//"),
    ("postgresql://app@db/notifier", "postgresql://app@db/notifier"),
    ("redis+socket:///data/redis.sock", "redis+socket:///data/redis.sock"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
