"""The pipeline's services, built once per worker process (after the fork)."""

from __future__ import annotations

import os

from config import load_settings
from notifier.pipeline import Services, build_services

__all__ = ["services"]

_cache: dict[int, Services] = {}


def services() -> Services:
    pid = os.getpid()
    if pid not in _cache:
        _cache.clear()
        _cache[pid] = build_services(load_settings())
    return _cache[pid]
