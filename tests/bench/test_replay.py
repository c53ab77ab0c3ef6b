"""The replay scenario's verdict (bench/replay.py): what makes the benchmark exit 1."""

from __future__ import annotations

from bench.receiver import Request
from bench.replay import DEAD_PREFIX, report

BEGAN = 1_000_000_000  # the replay command's start, epoch microseconds


def _records(replayed: list[int], live: list[int]) -> list[Request]:
    """Requests of the replayed deliveries (by number) after the command's start, and of live
    ones (by number), one published a second before the command and one after."""
    return ([Request(BEGAN + 1000 * (n + 1), 0, "/replay", f"{DEAD_PREFIX}{n}") for n in replayed]
            + [Request(BEGAN + 10_000 * n, BEGAN + 10_000 * n - 5000, "/replay", f"msg_{n}")
               for n in live])


def _problems(records: list[Request], *, peak: int = 8, rows: int = 3,
              attempts: int = 6, published: int = 2) -> list[str]:
    return report(records, peak, 3, 8, published, 0.0, BEGAN, 1.0, 0, BEGAN - 2_000_000,
                   rows + published, rows, attempts).problems


def test_each_delivered_once_within_the_cap_is_no_problem() -> None:
    result = report(_records([0, 1, 2], [-100, 1]), 8, 3, 8, 2, 0.0, BEGAN, 1.0, 0,
                     BEGAN - 2_000_000, 5, 3, 6)
    assert result.problems == []
    assert "at most 8 requests in flight" in result.line
    assert "3 distinct webhook-ids in 3 requests" in result.line


def test_a_replayed_delivery_lost_or_not_delivered_is_a_problem() -> None:
    assert _problems(_records([0, 1], [-100, 1]))  # never arrived
    assert _problems(_records([0, 1, 2], [-100, 1]), rows=2)  # its row not delivered


def test_a_delivery_sent_twice_is_a_problem() -> None:
    assert _problems(_records([0, 1, 2, 2], [-100, 1]))
    assert _problems(_records([0, 1, 2], [-100, 1]), attempts=7)
    assert _problems(_records([0, 1, 2], [-100, 1, 1]))  # a live one
    assert _problems(_records([0, 1, 2], [-100]))  # a live one lost


def test_more_requests_in_flight_than_the_cap_is_a_problem() -> None:
    assert _problems(_records([0, 1, 2], [-100, 1]), peak=9)
