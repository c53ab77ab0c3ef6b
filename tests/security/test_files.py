"""The embedded default's data folder is its owner's alone: the folder 0700, and the SQLite
file, the vault key and the Redis socket in it 0600 (or no wider)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from notifier.cli import main
from notifier.db import Database
from notifier.embedded import start_redis
from notifier.vault import vault_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The usual 022, whatever the runner's, so modes come from notifier, not from it."""
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.mark.usefixtures("usual_umask")
def test_the_data_folder_and_its_files_are_the_owners_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "notifier-data"
    for name in list(os.environ):
        if name.startswith("NOTIFIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NOTIFIER_DATA_DIR", str(data_dir))

    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    vault_for((), data_dir).seal("x")
    database = Database(f"sqlite:///{data_dir / 'notifier.db'}")
    try:
        with database.session() as session:  # a write, so the WAL files exist too
            session.execute(text("CREATE TABLE t (x INT)"))
    finally:
        database.dispose()

    assert _mode(data_dir) == 0o700
    files = [data_dir / "notifier.db", data_dir / "secret.key",
             *data_dir.glob("notifier.db-*")]
    assert {path.name: _mode(path) for path in files} == {path.name: 0o600 for path in files}


@pytest.mark.usefixtures("usual_umask")
def test_an_older_installs_open_data_folder_is_closed_when_redis_starts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    process = start_redis(data_dir)
    try:
        assert _mode(data_dir) == 0o700
        assert _mode(data_dir / "redis.sock") & 0o077 == 0
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
