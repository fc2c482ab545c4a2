"""Taking pieces from the swarm's holders: what they have comes from them (least loaded
first), the rest from the origin, and a holder's false piece is read from the origin."""

from __future__ import annotations

from swarmfly.services.peer.swarming import PARENT_FAILURES
from swarmfly.services.peer.takeover import Gathering

DIGEST = "ab" * 32


def test_holders_give_what_they_have_with_a_known_digest_the_origin_the_rest() -> None:
    digests = [DIGEST, DIGEST, None, DIGEST, DIGEST, DIGEST]
    held = {"a": {0, 1, 2}, "b": {1, 3}}
    gathering = Gathering.plan([0, 1, 2, 3, 4, 5], held, digests, hold_off={5})
    assert list(gathering.queue) == [(0, ["a"]), (1, ["a", "b"]), (3, ["b"])]
    # 2: held, but nothing to check its bytes against; 4: nobody has it; 5: a child reads
    # it from the origin now (it comes back from holders, or after its time).
    assert gathering.origin == [2, 4]
    assert Gathering.found(held) == {0, 1, 2, 3}


def test_with_the_whole_files_digest_a_held_piece_of_no_known_digest_comes_from_holders() -> None:
    """The scheduler that knew a lent child's digest of piece 2 lost it (its partition
    moved): the whole file's digest still proves whatever the holder sends."""
    digests = [DIGEST, None, None]
    gathering = Gathering.plan([0, 1, 2], {"a": {0, 2}}, digests, proven=True)
    assert list(gathering.queue) == [(0, ["a"]), (2, ["a"])]
    assert gathering.origin == [1]  # nobody has it


def test_the_least_loaded_holder_is_asked_first_and_a_failing_one_is_dropped() -> None:
    gathering = Gathering.plan([0, 1], {"a": {0, 1}, "b": {0, 1}}, [DIGEST, DIGEST])
    gathering.asking("a")
    assert gathering.next() == (0, ["b", "a"])
    gathering.answered("a")
    for _ in range(PARENT_FAILURES):
        gathering.refused("b", 0, corrupt=False)
    assert gathering.dropped == {"b"}
    assert gathering.next() == (1, ["a"])
    assert gathering.next() is None


def test_what_no_holder_delivered_is_read_unless_a_child_reads_it_but_a_false_piece_is() -> None:
    gathering = Gathering.plan([0, 1, 2, 3], {"a": {0, 1, 2, 3}}, [DIGEST] * 4)
    gathering.refused("a", 1, corrupt=True)  # its bytes did not match the lent digest
    for number in (0, 1, 2, 3):
        gathering.gave_up(number)
    # 0 arrived meanwhile; 2 and 1 are lent pieces a child still reads; only the seed's own
    # read settles what the lent child's digest of 1 was worth.
    assert gathering.rest(done={0}, hold_off={1, 2}) == [1, 3]
    assert gathering.disputed == {1}
