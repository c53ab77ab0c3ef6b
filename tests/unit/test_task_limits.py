"""Delivery tasks are bounded in time: stopped, then killed, before their slot lease expires."""

from __future__ import annotations

import tasks  # noqa: F401 - registers the tasks on the app
from config import load_settings
from notifier.client import DELIVER_TASK
from tasks.app import app


def test_delivery_tasks_are_stopped_then_killed_before_their_slot_lease_expires() -> None:
    settings = load_settings()
    app.finalize()
    deliver = app.tasks[DELIVER_TASK]

    assert deliver.soft_time_limit == settings.task_soft_time_limit
    assert deliver.time_limit == settings.task_time_limit
    assert settings.longest_task_seconds < deliver.soft_time_limit < deliver.time_limit \
        < settings.slot_lease_seconds
