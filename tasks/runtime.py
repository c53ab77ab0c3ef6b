"""The pipeline's services, built once per worker process (after the fork), shared by its
threads (the slow lane's pool)."""

from __future__ import annotations

import os
import threading

from config import load_settings
from notifier.pipeline import Services, build_services

__all__ = ["services"]

_cache: dict[int, Services] = {}
_lock = threading.Lock()


def services() -> Services:
    pid = os.getpid()
    with _lock:
        if pid not in _cache:
            _cache.clear()
            _cache[pid] = build_services(load_settings())
        return _cache[pid]
