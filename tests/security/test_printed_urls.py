"""What the ``notifier`` command prints never shows a password of the URLs it was given."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from notifier.cli import main
from notifier.vault import mask_url
from tests.conftest import wait_until

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


def test_notifier_up_prints_the_database_url_without_its_password(
        stack_env: dict[str, str], tmp_path: Path) -> None:
    command = shutil.which("notifier")
    assert command, "the notifier command is not installed (pip install -e .)"
    env = {**stack_env, "NOTIFIER_DATABASE_URL": stack_env["NOTIFIER_DATABASE_URL"].replace(
        "://postgres@", "://postgres:s3cret-pw@")}
    assert "s3cret-pw" in env["NOTIFIER_DATABASE_URL"]
    log = tmp_path / "up.log"
    with log.open("wb") as out:  # the children (a worker, beat) write here too
        up = subprocess.Popen([command, "up", "--concurrency", "1", "--slow-threads", "0",
                               "--port", "0", "--flower-port", "0"], env=env, cwd=tmp_path,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: " ready." in log.read_text() or up.poll() is not None, 90,
                   "the worker of notifier up")
        assert up.poll() is None, log.read_text()
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
    printed = log.read_text()
    assert "database: postgresql+psycopg://postgres:***@" in printed, printed
    assert "s3cret-pw" not in printed


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://app:hunter2@db:5432/notifier", "postgresql+psycopg://app:***@db:5432/notifier"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("amqp://guest:p%40ss@rabbit//", "amqp://guest:***@rabbit//"),
    ("postgresql://app@db/notifier", "postgresql://app@db/notifier"),
    ("redis+socket:///data/redis.sock", "redis+socket:///data/redis.sock"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
