"""How ``client.send_leases`` puts leases into delivery tasks."""

from __future__ import annotations

from typing import Any

from notifier.client import DELIVER_QUEUE, DELIVER_TASK, SLOW_QUEUE, send_leases
from notifier.queues import Lease


class App:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **options: Any) -> None:
        assert name == DELIVER_TASK
        self.sent.append(options)


def lease(webhook: str, count: int = 1, **options: Any) -> Lease:
    return Lease(webhook, f"token-{webhook}", tuple(f"msg_{webhook}_{n}" for n in range(count)),
                 **options)


def test_fast_leases_of_different_webhooks_share_tasks_up_to_the_most_deliveries() -> None:
    app: Any = App()
    send_leases(app, [lease("a", 2), lease("b"), lease("c", 2), lease("d", 5), lease("e")],
                most=5)

    assert [(task["args"][0], [m[0] for m in (task["kwargs"] or {}).get("more", [])])
            for task in app.sent] == [("a", ["b", "c"]), ("d", []), ("e", [])]
    assert app.sent[0]["kwargs"]["more"][1] == ["c", "token-c", ["msg_c_0", "msg_c_1"]]
    assert {task["queue"] for task in app.sent} == {DELIVER_QUEUE}


def test_slow_and_second_leases_of_a_webhook_go_alone() -> None:
    app: Any = App()
    send_leases(app, [lease("a"), lease("s", slow=True), lease("a"), lease("b")], most=20)

    alone = [(task["args"][0], task["queue"]) for task in app.sent
             if not (task["kwargs"] or {}).get("more")]
    assert alone == [("s", SLOW_QUEUE), ("a", DELIVER_QUEUE)]
    (shared,) = [task for task in app.sent if (task["kwargs"] or {}).get("more")]
    assert shared["args"][0] == "a" and [m[0] for m in shared["kwargs"]["more"]] == ["b"]


def test_leases_that_linger_alike_share_a_task_that_starts_after_the_linger() -> None:
    app: Any = App()
    send_leases(app, [lease("a", linger_ms=20), lease("b"), lease("c", linger_ms=20),
                      lease("d", linger_ms=50)], most=20)

    tasks = [(task["args"][0], [m[0] for m in (task["kwargs"] or {}).get("more", [])],
              task.get("countdown")) for task in app.sent]
    assert sorted(tasks, key=str) == sorted(
        [("a", ["c"], 0.02), ("b", [], None), ("d", [], 0.05)], key=str)


def test_a_task_handed_on_or_retried_names_the_claims_it_holds() -> None:
    app: Any = App()
    send_leases(app, [lease("a"), lease("b")], most=1, claimed_until=1234)

    assert [task["kwargs"] for task in app.sent] == [{"claimed_until": 1234}] * 2


def test_a_task_carries_what_it_sends_side_by_side_full_batches_of_several_webhooks(
        monkeypatch: Any) -> None:
    from types import SimpleNamespace

    from tasks import delivery

    app = App()
    monkeypatch.setattr(delivery.app, "send_task", app.send_task)
    for concurrency, tasks in ((4, [4, 1]), (1, [1] * 5)):
        settings = SimpleNamespace(batch_size=20, send_concurrency=concurrency)
        monkeypatch.setattr(delivery, "services", lambda s=settings: SimpleNamespace(settings=s))
        app.sent.clear()
        with delivery._sent_together() as send:
            for webhook in "abcde":  # a full batch each (fan-out over many busy webhooks)
                send(lease(webhook, 20))
        assert [1 + len((task["kwargs"] or {}).get("more", [])) for task in app.sent] == tasks


def test_leases_riding_with_a_fast_lane_lease_go_in_its_task_never_split() -> None:
    app: Any = App()
    send_leases(app, [lease("a", 3), lease("w", 2), lease("w", 2, rides=True),
                      lease("w", 2, rides=True), lease("b", 2)], most=20)

    # "w" and its riders go in a task of their own, whole, though they would fit beside "a":
    # what waits for "w" boards that task as it starts (Queues.take_many).
    assert [(task["args"][0], [m[0] for m in (task["kwargs"] or {}).get("more", [])],
             task["queue"]) for task in app.sent] == [
        ("w", ["w", "w"], DELIVER_QUEUE), ("a", ["b"], DELIVER_QUEUE)]


def test_a_riding_lease_sent_without_its_fast_lane_lease_goes_alone_by_the_slow_lane() -> None:
    app: Any = App()
    send_leases(app, [lease("w", rides=True), lease("a"), lease("x", rides=True)], most=20)

    assert [(task["args"][0], task["queue"], task["kwargs"]) for task in app.sent] == [
        ("w", SLOW_QUEUE, {"slow": True}), ("x", SLOW_QUEUE, {"slow": True}),
        ("a", DELIVER_QUEUE, None)]


def test_riding_leases_of_one_webhook_sent_without_their_fast_lane_lease_each_go_alone() -> None:
    app: Any = App()
    send_leases(app, [lease("w", rides=True), lease("w", 2, rides=True)], most=20)

    assert [(task["args"][2], task["queue"], task["kwargs"]) for task in app.sent] == [
        (["msg_w_0"], SLOW_QUEUE, {"slow": True}), (["msg_w_0", "msg_w_1"], SLOW_QUEUE, {"slow": True})]
