"""The digests a download checks pieces against, and on whose word each one stands."""

from __future__ import annotations

from swarmfly.services.peer.ledger import DIGEST_POLL, DigestLedger

A, B, C, LIE = "a" * 64, "b" * 64, "c" * 64, "f" * 64


def test_a_page_fills_what_is_unknown_and_says_what_changed() -> None:
    ledger = DigestLedger()
    known: list[str | None] = [None, None, None, None]
    changed = ledger.take(1, [B, None, C], (), known=known, held=set(), now=1.0)
    assert known == [None, B, None, C]
    assert changed == [1, 3]
    assert ledger.offset(known) == 0
    assert ledger.take(0, [A, B], (), known=known, held=set(), now=1.1) == [0], "B: known"
    assert ledger.offset(known) == 2


def test_a_page_past_the_layout_changes_nothing() -> None:
    ledger = DigestLedger()
    known: list[str | None] = [None, None]
    assert ledger.take(1, [A, B], (), known=known, held=set(), now=1.0) == []
    assert known == [None, None]
    assert ledger.take(0, [A], (), known=[], held=set(), now=1.0) == [], "no layout yet"


def test_a_lent_childs_word_is_provisional_until_the_seed_states_it() -> None:
    ledger = DigestLedger()
    known: list[str | None] = [None, None, None]
    ledger.take(0, [A, LIE, C], {1}, known=known, held=set(), now=1.0)
    assert ledger.vouched(1) and not ledger.vouched(0)
    assert ledger.offset(known) == 1, "a provisional digest may still change: asked again"
    # The seed read piece 1 itself: its digest replaces the child's, which was a lie.
    assert ledger.take(1, [B], (), known=known, held=set(), now=2.0) == [1]
    assert known == [A, B, C]
    assert not ledger.vouched(1)
    assert ledger.offset(known) == 3
    assert ledger.suspects() == []


def test_a_piece_held_on_a_word_the_seed_refutes_is_a_suspect() -> None:
    ledger = DigestLedger()
    known: list[str | None] = [A, LIE]
    ledger.take(0, [A, LIE], {1}, known=known, held={0, 1}, now=1.0)
    assert ledger.suspects() == [1], "held on a lent child's word"
    assert ledger.take(1, [B], (), known=known, held={0, 1}, now=2.0) == []
    assert known == [A, LIE], "what we hold was checked against LIE: it stays till repaired"
    assert ledger.refuted == {1: B}
    assert ledger.suspects() == [1]


def test_a_lending_seeds_loans_are_suspects_with_what_was_refuted() -> None:
    ledger = DigestLedger(lent_out={2, 7})
    known: list[str | None] = [A, LIE, C]
    ledger.take(0, [A, B, C], (), known=known, held={0, 1, 2}, now=1.0)
    assert ledger.suspects() == [1, 2, 7]


def test_digests_are_polled_only_when_no_push_came_lately() -> None:
    ledger = DigestLedger()
    assert ledger.poll_due(0.0)
    ledger.take(0, [A], (), known=[None], held=set(), now=5.0)
    assert not ledger.poll_due(5.0 + DIGEST_POLL / 2)
    assert ledger.poll_due(5.0 + DIGEST_POLL * 1.5)
