"""The upload server's admission core: who uploads next, and who is displaced."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from swarmfly.services.peer import admission as admission_module
from swarmfly.services.peer.admission import Admission


def test_requests_take_free_slots_then_wait_and_are_served_least_held_first() -> None:
    queue: Admission[str] = Admission(slots=2)
    assert queue.enter("a", 0.5) and queue.enter("b", 0.9)
    assert not queue.enter("rich", 0.8)
    assert not queue.enter("poor", 0.1)
    assert not queue.enter("rich-too", 0.8)  # same share: who came first goes first
    assert (queue.running, queue.waiting) == (2, 3)
    assert [queue.release() for _ in range(3)] == ["poor", "rich", "rich-too"]
    assert queue.release() is None and queue.release() is None
    assert (queue.running, queue.waiting) == (0, 0)


def test_a_request_arriving_while_others_wait_waits_behind_the_needier() -> None:
    queue: Admission[str] = Admission(slots=1)
    assert queue.enter("a", 0.0)
    assert not queue.enter("b", 0.3)
    assert queue.release() == "b"  # the slot goes straight to the waiter
    assert not queue.enter("c", 0.0)  # the slot is b's now, though it was freed a moment ago
    assert (queue.running, queue.waiting) == (1, 1)


def test_only_a_child_holding_less_than_the_richest_waiting_displaces_it() -> None:
    queue: Admission[str] = Admission(slots=1)
    queue.enter("running", 1.0)
    queue.enter("mid", 0.5)
    queue.enter("rich", 0.75)
    assert queue.displace(0.75) is None  # as needy as the richest: no
    assert queue.displace(0.8) is None
    assert queue.displace(0.25) == "rich"
    assert queue.waiting == 1
    assert queue.displace(0.25) == "mid"
    assert queue.displace(0.0) is None  # nobody waits
    assert queue.release() is None


def test_a_waiter_that_left_is_never_served_nor_displaced() -> None:
    queue: Admission[str] = Admission(slots=1)
    queue.enter("running", 0.0)
    queue.enter("gone", 0.1)
    queue.enter("stays", 0.9)
    queue.leave("gone")
    queue.leave("never-came")
    assert queue.displace(0.95) is None
    assert queue.release() == "stays"
    assert queue.release() is None


def test_what_a_child_says_it_holds_is_at_least_what_it_was_sent() -> None:
    queue: Admission[str] = Admission(slots=1)
    assert queue.share("liar", 0, 10) == 0.0
    for _ in range(4):
        queue.sent("liar")
    assert queue.share("liar", 0, 10) == 0.4
    assert queue.share("liar", 7, 10) == 0.7
    assert queue.share(None, 3, 10) == 0.3  # capabilities off: nobody to hold to account
    assert queue.share("honest", None, 10) == 1.0  # says nothing: served after all who do
    assert queue.share("liar", 0, 0) == 1.0
    queue.sent(None)  # nobody to count


def test_children_remembered_are_bounded() -> None:
    queue: Admission[str] = Admission(slots=1)
    for n in range(admission_module.MAX_CHILDREN + 10):
        queue.sent(f"child-{n}")
    assert len(queue._sent) == admission_module.MAX_CHILDREN
    assert queue.share("child-0", 0, 4) == 0.0  # the least recently served went first


def test_the_heap_does_not_grow_with_waiters_that_left() -> None:
    queue: Admission[int] = Admission(slots=1)
    queue.enter(-1, 0.0)
    queue.enter(-2, 0.5)  # one stays waiting throughout
    for n in range(10_000):
        queue.enter(n, 0.25)
        queue.leave(n)
    assert len(queue._heap) <= 2 * queue.waiting + 17
    assert queue.release() == -2


@given(
    st.lists(
        st.tuples(st.sampled_from(["enter", "displace", "leave", "release"]), st.integers(0, 8)),
        max_size=80,
    ),
    st.integers(1, 3),
)
def test_the_slots_are_never_oversold_and_the_order_is_by_need(
    steps: list[tuple[str, int]], slots: int
) -> None:
    queue: Admission[int] = Admission(slots=slots)
    waiting: dict[int, tuple[float, int]] = {}  # waiter -> (share, arrival): the model
    running = 0
    for serial, (op, value) in enumerate(steps):
        share = value / 8
        if op == "enter":
            if queue.enter(serial, share):
                assert running < slots and not waiting
                running += 1
            else:
                waiting[serial] = (share, serial)
        elif op == "displace":
            out = queue.displace(share)
            richest = max(waiting, key=lambda w: waiting[w], default=None)
            if richest is not None and waiting[richest][0] > share:
                assert out == richest
                del waiting[richest]
            else:
                assert out is None
        elif op == "leave" and waiting:
            gone = sorted(waiting)[value % len(waiting)]
            queue.leave(gone)
            del waiting[gone]
        elif op == "release" and running:
            nxt = queue.release()
            neediest = min(waiting, key=lambda w: waiting[w], default=None)
            assert nxt == neediest
            if nxt is None:
                running -= 1
            else:
                del waiting[nxt]
        assert (queue.running, queue.waiting) == (running, len(waiting))
        assert queue.running <= slots
