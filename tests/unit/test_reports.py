"""What a download tells its scheduler: batches, the layout once, loans once per scheduler."""

from __future__ import annotations

from swarmfly.contracts import messages
from swarmfly.services.peer.reports import REPORT_BATCH, Reports


def report(number: int) -> messages.PieceReport:
    return messages.PieceReport(number, digest=f"{number:064x}")


def test_nothing_to_tell_sends_nothing() -> None:
    assert Reports().due({}) is None


def test_pieces_go_in_batches_of_at_most_report_batch_in_order() -> None:
    reports = Reports()
    for n in range(REPORT_BATCH + 5):
        reports.piece(report(n))
    first = reports.due({})
    assert first is not None and [p.number for p in first.pieces] == list(range(REPORT_BATCH))
    reports.sent(first)
    second = reports.due({})
    assert second is not None and [p.number for p in second.pieces] == [
        REPORT_BATCH + i for i in range(5)
    ]
    reports.sent(second)
    assert reports.due({}) is None


def test_the_layout_goes_until_a_batch_with_it_is_sent() -> None:
    reports = Reports()
    reports.tell_layout()
    batch = reports.due({})
    assert batch is not None and batch.layout and batch.pieces == []
    assert reports.failed(batch, "timeout") == "retry"
    again = reports.due({})
    assert again is not None and again.layout, "not told yet: it goes again"
    reports.sent(again)
    assert reports.due({}) is None


def test_a_batch_the_scheduler_did_not_get_goes_again_first() -> None:
    reports = Reports()
    reports.piece(report(1))
    batch = reports.due({})
    assert batch is not None
    reports.piece(report(2))
    assert reports.failed(batch, "unavailable") == "retry"
    again = reports.due({})
    assert again is not None and [p.number for p in again.pieces] == [1, 2]


def test_a_batch_refused_for_good_is_dropped() -> None:
    reports = Reports()
    reports.piece(report(1))
    batch = reports.due({})
    assert batch is not None
    assert reports.failed(batch, "conflict") == "drop"
    assert reports.due({}) is None


def test_loans_are_told_once_and_again_to_a_scheduler_that_lost_the_download() -> None:
    reports = Reports()
    loans = {7: "child-a", 9: "child-b"}
    batch = reports.due(loans)
    assert batch is not None and [(x.number, x.peer_id) for x in batch.lent] == [
        (7, "child-a"),
        (9, "child-b"),
    ]
    reports.sent(batch)
    assert reports.due(loans) is None, "told: not again"
    loans[11] = "child-c"
    fresh = reports.due(loans)
    assert fresh is not None and [x.number for x in fresh.lent] == [11]
    reports.piece(report(3))
    failing = reports.due(loans)
    assert failing is not None
    assert reports.failed(failing, "not_found") == "rejoin"
    after = reports.due(loans)
    assert after is not None and {x.number for x in after.lent} == {7, 9, 11}


def test_loans_not_told_stay_for_the_next_batch() -> None:
    reports = Reports()
    batch = reports.due({1: "c"})
    assert batch is not None
    assert reports.failed(batch, "timeout") == "retry"
    again = reports.due({1: "c"})
    assert again is not None and [x.number for x in again.lent] == [1]
