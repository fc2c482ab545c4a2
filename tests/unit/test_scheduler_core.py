"""The scheduler's pure core, driven with explicit ``now`` values and no IO."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmfly.content import TaskContent
from swarmfly.errors import SwarmflyError
from swarmfly.placement import rendezvous
from swarmfly.plugins.evaluators.default import evaluate
from swarmfly.plugintypes import Candidate, Evaluation
from swarmfly.services.scheduler.core import (
    BLOCK_SECONDS,
    FILTER_LIMIT,
    LAGGARD_PARENTS,
    MAX_RESCHEDULE_MS,
    MAX_WAIT_MS,
    RESCHEDULE_PEERS,
    SAMPLE_SIZE,
    SEED_CHILDREN,
    WAITERS_PER_WAIT,
    Evaluator,
    HostSpec,
    PieceDigests,
    PieceReport,
    Schedule,
    Scheduler,
    TriggerSeed,
)
from swarmfly.services.scheduler.service import schedule_message


def new_core(**settings: Any) -> Scheduler:
    """The core with the built-in default evaluator, as a scheduler runs it unconfigured."""
    return Scheduler(**{"evaluator": evaluate, **settings})


T = "1" * 64
T2 = "2" * 64
MiB = 1024 * 1024
CONTENT = TaskContent(content_length=4 * 4 * MiB, piece_length=4 * MiB, piece_count=4)


def digest(number: int) -> str:
    return hashlib.sha256(f"piece {number}".encode()).hexdigest()


def host(name: str, *, kind: str = "normal", upload_slots: int = 64) -> HostSpec:
    octet = int(hashlib.sha256(name.encode()).hexdigest()[:2], 16)
    return HostSpec(name, f"10.0.0.{octet}", 4000, kind, upload_slots=upload_slots)


def join(s: Scheduler, peer: str, host_id: str, now: float = 0.0, task: str = T) -> Schedule:
    schedule, _ = s.register(task_id=task, peer_id=peer, host=host(host_id), now=now)
    return schedule


def add_seed(s: Scheduler, now: float = 0.0, *, peer: str = "seed", task: str = T) -> None:
    schedule, effects = s.register(
        task_id=task,
        peer_id=peer,
        host=host("storage-" + peer, kind="seed"),
        now=now,
        content=CONTENT,
        seed=True,
    )
    assert schedule.action == "back_to_source"
    assert effects == []
    s.report_pieces(
        task_id=task,
        peer_id=peer,
        pieces=[PieceReport(n, digest(n)) for n in range(CONTENT.piece_count)],
        now=now,
    )


def ids(schedule: Schedule) -> set[str]:
    return {p.peer_id for p in schedule.parents}


def ranked(*order: str) -> Evaluator:
    """An evaluator that prefers peers in the given order (earlier is better)."""
    rank = {peer: len(order) - i for i, peer in enumerate(order)}

    def evaluate(parent: Candidate, evaluation: Evaluation) -> float:
        return float(rank.get(parent.peer_id, 0))

    return evaluate


# -- seeds, waiting and back to source -----------------------------------------------------


def test_first_register_of_a_new_task_waits_and_triggers_one_seed() -> None:
    s = new_core()
    schedule, effects = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    assert schedule.action == "wait"
    assert schedule.parents == ()
    assert schedule.retry_after_ms is not None and schedule.retry_after_ms > 0
    assert effects == [TriggerSeed(T)]

    _, again = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.1)
    _, other = s.register(task_id=T, peer_id="b", host=host("h2"), now=0.2)
    _, resched = s.reschedule(task_id=T, peer_id="a", now=0.3)
    assert again == other == resched == []


def test_each_new_task_triggers_its_own_seed() -> None:
    s = new_core()
    _, first = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    _, second = s.register(task_id=T2, peer_id="b", host=host("h1"), now=0.0)
    assert first == [TriggerSeed(T)]
    assert second == [TriggerSeed(T2)]


def test_normal_peers_get_the_seed_as_parent_once_it_registers() -> None:
    s = new_core()
    assert join(s, "a", "h1").action == "wait"
    add_seed(s, now=1.0)

    schedule, effects = s.reschedule(task_id=T, peer_id="a", now=1.5)
    assert schedule.action == "parents"
    assert "seed" in ids(schedule)
    assert effects == []
    seed_info = next(p for p in schedule.parents if p.peer_id == "seed")
    assert seed_info.host_id == "storage-seed"
    assert seed_info.type == "seed"
    assert seed_info.address == f"http://{host('storage-seed', kind='seed').ip}:4000"
    assert schedule.content == CONTENT

    later = join(s, "b", "h2", now=2.0)
    assert later.action == "parents"
    assert "seed" in ids(later)


def test_seed_unavailable_sends_the_next_peer_to_the_source() -> None:
    s = new_core()
    assert join(s, "a", "h1").action == "wait"
    s.seed_unavailable(T)

    schedule, effects = s.reschedule(task_id=T, peer_id="a", now=0.5)
    assert schedule.action == "back_to_source"
    assert effects == []

    for n, peer in enumerate(["b", "c", "d"]):
        later = join(s, peer, f"h{n + 2}", now=1.0)
        assert later.action == "parents"
        assert "a" in ids(later)


def test_seed_unavailable_for_an_unknown_task_is_harmless() -> None:
    s = new_core()
    s.seed_unavailable(T)
    assert join(s, "a", "h1").action == "wait"


def test_a_seed_that_never_comes_times_out_to_back_to_source() -> None:
    s = new_core(seed_timeout=30.0)
    assert join(s, "a", "h1", now=0.0).action == "wait"
    assert s.reschedule(task_id=T, peer_id="a", now=29.0)[0].action == "wait"
    assert s.reschedule(task_id=T, peer_id="a", now=30.5)[0].action == "back_to_source"


def test_a_failed_seed_lets_the_next_request_trigger_a_seed_again() -> None:
    s = new_core()
    join(s, "a", "h1")
    add_seed(s, now=1.0)
    s.result(task_id=T, peer_id="seed", success=False, now=2.0)
    _, effects = s.reschedule(task_id=T, peer_id="a", now=3.0)
    assert effects == [TriggerSeed(T)]


def test_a_complete_peer_rejoining_gets_no_parents_and_no_seed() -> None:
    s = new_core()
    schedule, effects = s.register(
        task_id=T, peer_id="a", host=host("h1"), now=0.0, pieces=range(4), content=CONTENT
    )
    assert schedule.action == "parents"
    assert schedule.parents == ()
    assert effects == []
    assert "a" in ids(join(s, "b", "h2", now=1.0))


def test_register_ignores_pieces_beyond_the_task() -> None:
    s = new_core()
    add_seed(s)
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0, pieces=[0, 9, 99], content=CONTENT)
    with pytest.raises(SwarmflyError, match="reported 1 of 4"):
        s.result(task_id=T, peer_id="a", success=True, now=1.0)


def test_register_with_different_content_is_a_conflict() -> None:
    s = new_core()
    add_seed(s)
    other = TaskContent(CONTENT.content_length - 1, CONTENT.piece_length, CONTENT.piece_count)
    with pytest.raises(SwarmflyError, match="content length") as caught:
        s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0, content=other)
    assert caught.value.code == "conflict"


def test_a_peer_id_cannot_move_to_another_task_or_host() -> None:
    s = new_core()
    join(s, "a", "h1")
    with pytest.raises(SwarmflyError, match="another task or host") as caught:
        join(s, "a", "h1", task=T2)
    assert caught.value.code == "conflict"
    with pytest.raises(SwarmflyError, match="another task or host"):
        join(s, "a", "h2")


# -- parent choice -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_at_most_candidate_parents_are_offered(limit: int) -> None:
    s = new_core(candidate_parents=limit)
    add_seed(s)
    for n in range(8):
        join(s, f"p{n}", f"h{n}")
    schedule = join(s, "late", "h-late", now=1.0)
    assert schedule.action == "parents"
    assert len(schedule.parents) == limit
    assert len(ids(schedule)) == limit


def test_a_peer_is_never_offered_itself() -> None:
    s = new_core()
    add_seed(s)
    for n in range(5):
        assert f"p{n}" not in ids(join(s, f"p{n}", f"h{n}"))


def test_a_parent_on_the_same_host_is_not_offered() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    schedule = join(s, "b", "h1")
    assert "a" not in ids(schedule)
    assert "seed" in ids(schedule)


def test_a_host_at_upload_capacity_ranks_after_an_idle_one() -> None:
    # Its load is as old as its heartbeat: still offered (the seed, the only source, above
    # all), but an idle parent with as much to give comes first.
    s = new_core(candidate_parents=1)
    storage = host("storage-seed", kind="seed", upload_slots=2)
    s.register(task_id=T, peer_id="seed", host=storage, now=0.0, content=CONTENT, seed=True)
    s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(0, digest(0))], now=0.0)
    assert s.heartbeat(storage, uploads=2, now=0.5)
    assert ids(join(s, "a", "h1", now=1.0)) == {"seed"}

    for name, uploads in (("busy", 2), ("idle", 0)):
        join(s, name, name, now=1.0)
        s.report_pieces(task_id=T, peer_id=name, pieces=[PieceReport(0)], now=1.0)
        s.heartbeat(host(name), uploads=uploads, now=1.5)
    assert ids(join(s, "child", "h9", now=2.0)) == {"idle"}


def test_a_host_with_no_upload_slots_is_never_offered() -> None:
    s = new_core()
    s.register(
        task_id=T,
        peer_id="seed",
        host=host("storage-seed", kind="seed", upload_slots=0),
        now=0.0,
        seed=True,
    )
    assert "seed" not in ids(join(s, "a", "h1"))


def test_blocklisted_parents_are_not_offered_to_that_child() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    join(s, "b", "h2")
    schedule, _ = s.reschedule(task_id=T, peer_id="b", now=1.0, blocklist=["seed"])
    assert "seed" not in ids(schedule)
    assert ids(schedule) == {"a"}
    # The blocklist sticks to the child.
    schedule, _ = s.reschedule(task_id=T, peer_id="b", now=2.0)
    assert "seed" not in ids(schedule)
    # Other children still get it.
    assert "seed" in ids(join(s, "c", "h3", now=3.0))
    # A failed parent may recover: after a while the child may be offered it again.
    schedule, _ = s.reschedule(task_id=T, peer_id="b", now=1.0 + BLOCK_SECONDS + 1)
    assert "seed" in ids(schedule)


def test_a_corrupt_parent_is_excluded_for_every_child_of_the_task() -> None:
    s = new_core()
    add_seed(s)
    for n in range(4):
        join(s, f"p{n}", f"h{n}")
    s.reschedule(task_id=T, peer_id="p0", now=1.0, bad_parents=[("seed", "corrupt")])

    for n in range(1, 4):
        schedule, _ = s.reschedule(task_id=T, peer_id=f"p{n}", now=2.0)
        assert "seed" not in ids(schedule)
    for n in range(4, 8):
        assert "seed" not in ids(join(s, f"p{n}", f"h{n}", now=3.0))


def test_a_corrupt_parent_still_serves_other_tasks() -> None:
    s = new_core()
    add_seed(s, task=T)
    add_seed(s, task=T2, peer="seed2")
    join(s, "a", "h1")
    s.reschedule(task_id=T, peer_id="a", now=1.0, bad_parents=[("seed", "corrupt")])
    assert "seed2" in ids(join(s, "b", "h2", task=T2))


def test_a_slow_parent_is_only_blocked_for_the_child_that_reported_it() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    join(s, "b", "h2")
    schedule, _ = s.reschedule(task_id=T, peer_id="b", now=1.0, bad_parents=[("seed", "slow")])
    assert "seed" not in ids(schedule)
    assert "seed" in ids(join(s, "c", "h3", now=2.0))


def test_failed_peers_are_not_offered() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    s.result(task_id=T, peer_id="a", success=False, now=1.0)
    assert "a" not in ids(join(s, "b", "h2", now=2.0))


def test_a_succeeded_peer_is_offered() -> None:
    s = new_core()
    add_seed(s)
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(n) for n in range(4)], now=1.0)
    s.result(task_id=T, peer_id="a", success=True, now=1.0)
    assert "a" in ids(join(s, "b", "h2", now=2.0))


def test_acyclic_a_parent_is_not_offered_its_own_child() -> None:
    s = new_core(acyclic=True)
    add_seed(s)
    join(s, "a", "h1")
    assert "a" in ids(join(s, "b", "h2"))  # a is b's parent
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(0)], now=0.5)
    schedule, _ = s.reschedule(task_id=T, peer_id="a", now=1.0)
    assert "b" not in ids(schedule)


def test_by_default_two_peers_trade_both_ways() -> None:
    # a is b's parent; b got piece 0 (from the seed), which a lacks: b may serve a.
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(1)], now=0.2)
    assert "a" in ids(join(s, "b", "h2"))
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(0)], now=0.5)
    schedule, _ = s.reschedule(task_id=T, peer_id="a", now=1.0)
    assert "b" in ids(schedule)


def test_no_peer_is_offered_a_descendant_along_a_chain() -> None:
    chain = ["p0", "p1", "p2", "p3", "p4"]
    # Prefer the newest peer, so every peer picks the previous one: seed <- p0 <- p1 <- ...
    s = new_core(candidate_parents=1, evaluator=ranked(*reversed(chain), "seed"), acyclic=True)
    add_seed(s)
    previous = "seed"
    for n, peer in enumerate(chain):
        assert ids(join(s, peer, f"h{n}")) == {previous}
        # Each holds a piece the next lacks: a parent with nothing to give is ranked last.
        s.report_pieces(task_id=T, peer_id=peer, pieces=[PieceReport(n % 4)], now=0.5)
        previous = peer

    for n, peer in enumerate(chain):
        schedule, _ = s.reschedule(task_id=T, peer_id=peer, now=1.0 + n)
        assert not ids(schedule) & set(chain[n:]), (peer, ids(schedule))
        assert ids(schedule)  # an ancestor (or the seed) is still there


def test_a_finished_descendant_may_serve_again() -> None:
    s = new_core(candidate_parents=1, evaluator=ranked("b", "a", "seed"), acyclic=True)
    add_seed(s)
    assert ids(join(s, "a", "h1")) == {"seed"}
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0)], now=0.5)
    assert ids(join(s, "b", "h2")) == {"a"}
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(n) for n in range(4)], now=1.0)
    s.result(task_id=T, peer_id="b", success=True, now=1.0)
    schedule, _ = s.reschedule(task_id=T, peer_id="a", now=2.0)
    assert ids(schedule) == {"b"}


def test_parents_with_something_to_give_come_first() -> None:
    # The evaluator prefers c, then b, then a; only a holds a piece the child lacks.
    s = new_core(candidate_parents=1, evaluator=ranked("c", "b", "a", "seed"))
    add_seed(s)
    for n, peer in enumerate("abc"):
        join(s, peer, f"h{n}")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(2)], now=0.5)
    assert ids(join(s, "child", "h9")) == {"a"}


def _assert_acyclic(s: Scheduler) -> None:
    running = {pid: p for pid, p in s.peers.items() if p.state == "running"}
    done: set[str] = set()

    def visit(pid: str, path: list[str]) -> None:
        assert pid not in path, f"cycle: {[*path, pid]}"
        if pid in done:
            return
        for parent in running[pid].parents:
            if parent in running:
                visit(parent, [*path, pid])
        done.add(pid)

    for pid in running:
        visit(pid, [])


def _assert_bookkeeping(s: Scheduler) -> None:
    """What the core keeps incrementally (so that a decision costs the same in any swarm)
    equals what a scan of every peer finds."""
    for task in s.tasks.values():
        assert sorted(task.order) == sorted(task.peers)
        assert all(task.order[index] == pid for pid, index in task.slot.items())
        assert set(task.sources) == {pid for pid, p in task.peers.items() if p.is_source}
        load: dict[str, int] = {}
        for peer in task.peers.values():
            if peer.state == "running":
                for parent_id in peer.parents:
                    load[parent_id] = load.get(parent_id, 0) + 1
        assert task.load == load
    by_host: dict[str, set[str]] = {}
    for peer in s.peers.values():
        by_host.setdefault(peer.host_id, set()).add(peer.id)
    assert s.host_peers == by_host


PEERS = [f"p{n}" for n in range(6)]
KINDS = ["register", "register", "reschedule", "reschedule", "fail", "succeed", "leave", "seed"]
OPS = st.lists(
    st.tuples(
        st.sampled_from([*KINDS, "seed_unavailable"]),
        st.sampled_from(PEERS),
        st.sets(st.sampled_from(PEERS), max_size=2),
    ),
    min_size=5,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, candidates=st.integers(min_value=1, max_value=4), seed=st.integers(0, 2**16))
def test_random_histories_never_make_a_cycle(
    ops: list[tuple[str, str, set[str]]], candidates: int, seed: int
) -> None:
    s = new_core(candidate_parents=candidates, rng=random.Random(seed), acyclic=True)
    for now, (op, peer, blocklist) in enumerate(ops):
        host_id = f"h{PEERS.index(peer) % 4}"  # some peers share a host
        if op == "register":
            assert peer not in ids(join(s, peer, host_id, now=now))
        elif op == "seed":
            s.register(
                task_id=T, peer_id="seed", host=host("storage", kind="seed"), now=now, seed=True
            )
        elif op == "seed_unavailable":
            s.seed_unavailable(T)
        elif peer not in s.peers:
            continue
        elif op == "reschedule":
            schedule, _ = s.reschedule(task_id=T, peer_id=peer, now=now, blocklist=blocklist)
            assert not ids(schedule) & (blocklist | {peer})
        elif op in ("fail", "succeed"):
            s.result(task_id=T, peer_id=peer, success=op == "succeed", now=now)
        elif op == "leave":
            s.leave(host_id, [peer])
        _assert_acyclic(s)
        _assert_bookkeeping(s)


def test_a_decision_in_a_large_swarm_weighs_a_bounded_sample() -> None:
    """Past SAMPLE_SIZE peers a decision scores a random sample, not the swarm: what it costs
    does not grow with the swarm (bench/core.py measures it), and it still gives a child
    parents it may use, and spreads children over them."""
    scored: list[str] = []

    def counting(parent: Candidate, evaluation: Evaluation) -> float:
        scored.append(parent.peer_id)
        return float(parent.finished_pieces)

    s = new_core(candidate_parents=4, evaluator=counting, rng=random.Random(7))
    add_seed(s)
    peers = [f"p{n}" for n in range(4 * SAMPLE_SIZE)]
    for n, peer in enumerate(peers):
        join(s, peer, f"h{n}")
        s.report_pieces(task_id=T, peer_id=peer, pieces=[PieceReport(n % 4)], now=0.5)
    chosen: dict[str, int] = {}
    for n in range(200):
        child = peers[n]
        scored.clear()
        blocked = peers[n + 1]
        schedule, _ = s.reschedule(task_id=T, peer_id=child, now=1.0, blocklist=[blocked])
        assert len(scored) <= FILTER_LIMIT, "at most FILTER_LIMIT candidates are scored"
        parents = ids(schedule)
        assert parents and len(parents) <= 4
        assert not parents & {child, blocked}
        for parent in parents:
            chosen[parent] = chosen.get(parent, 0) + 1
    assert len(chosen) > 50, "children are spread over the swarm, not sent to the same few"
    _assert_bookkeeping(s)


def test_a_seed_serves_a_bounded_few_children_at_a_time() -> None:
    """A seed is offered to SEED_CHILDREN running children at most: those keep it, the others
    take its pieces from them; as its children finish, it is offered to new ones."""
    s = new_core(candidate_parents=4, rng=random.Random(3))
    add_seed(s)
    children = [f"c{n}" for n in range(SEED_CHILDREN + 40)]
    for n, child in enumerate(children):
        join(s, child, f"h{n}", now=0.1)
        if n % 3 == 0:  # some hold a piece to give, as a swarm under way does
            s.report_pieces(task_id=T, peer_id=child, pieces=[PieceReport(n % 4)], now=0.2)
    served = [c for c in children if "seed" in s.peers[c].parents]
    assert len(served) == SEED_CHILDREN
    assert s.tasks[T].load["seed"] == SEED_CHILDREN
    schedule, _ = s.reschedule(task_id=T, peer_id=served[0], now=1.0)
    assert "seed" in ids(schedule), "a child the seed serves keeps it"
    waiting = next(c for c in children if c not in served)
    schedule, _ = s.reschedule(task_id=T, peer_id=waiting, now=1.0)
    assert "seed" not in ids(schedule) and ids(schedule), "others get peers, not the seed"
    for child in served[:5]:
        s.report_pieces(task_id=T, peer_id=child, pieces=[PieceReport(n) for n in range(4)], now=2)
        s.result(task_id=T, peer_id=child, success=True, now=2.0)
    assert s.tasks[T].load["seed"] == SEED_CHILDREN - 5
    others = [c for c in children if c not in served]
    given = [c for c in others if "seed" in ids(s.reschedule(task_id=T, peer_id=c, now=3.0)[0])]
    assert len(given) == 5, "the finished children's places go to the next (a sampled seed)"
    assert s.tasks[T].load["seed"] == SEED_CHILDREN
    _assert_bookkeeping(s)


def test_waiting_children_come_back_less_often_in_a_larger_swarm() -> None:
    """Told to wait (the seed is on its way), a child of a large swarm asks again later: the
    swarm's wait polls cost the scheduler a bounded rate, not one per child per 50 ms."""
    s = new_core()
    hints = []
    for n in range(20 * WAITERS_PER_WAIT):
        schedule = join(s, f"w{n}", f"h{n}")
        assert schedule.action == "wait"
        assert schedule.retry_after_ms is not None
        hints.append(schedule.retry_after_ms)
    assert hints[0] == hints[WAITERS_PER_WAIT - 1] == 50
    assert hints == sorted(hints) and hints[-1] == 20 * 50
    for n in range(40 * WAITERS_PER_WAIT):
        join(s, f"x{n}", f"g{n}")
    assert join(s, "last", "h-last").retry_after_ms == MAX_WAIT_MS


def test_children_of_a_large_swarm_are_told_to_reschedule_less_often() -> None:
    """Past RESCHEDULE_PEERS peers a schedule says how long a child may go before asking for
    fresher parents: the task's periodic reschedules stay near RESCHEDULE_PEERS a second."""
    s = new_core(rng=random.Random(5))
    add_seed(s)
    hints = []
    for n in range(3 * RESCHEDULE_PEERS - 1):  # with the seed, 3 * RESCHEDULE_PEERS peers
        schedule = join(s, f"c{n}", f"h{n}")
        assert schedule.action == "parents"
        hints.append(schedule.retry_after_ms)
    assert set(hints[: RESCHEDULE_PEERS - 1]) == {None}, "a smaller swarm: the peer's own pace"
    assert hints[-1] == 3000 and hints == sorted(hints, key=lambda h: h or 0)
    wire = schedule_message(Schedule("parents", (), None, hints[-1]), None, None).to_dict()
    assert wire["retry_after_ms"] == 3000
    assert MAX_RESCHEDULE_MS <= 60_000, "within the contract's bound"


# -- hosts: heartbeats, expiry, leave -------------------------------------------------------


def test_heartbeat_of_an_unknown_host_says_so() -> None:
    s = new_core()
    assert s.heartbeat(host("h1"), uploads=0, now=0.0) is False
    assert s.heartbeat(host("h1"), uploads=0, now=1.0) is True


def test_heartbeat_after_a_scheduler_restart_is_unknown() -> None:
    before = new_core()
    join(before, "a", "h1")
    assert before.heartbeat(host("h1"), uploads=0, now=1.0) is True
    assert new_core().heartbeat(host("h1"), uploads=0, now=1.0) is False


def test_a_host_whose_heartbeats_stop_is_dropped_with_its_peers() -> None:
    s = new_core(host_ttl=15.0)
    add_seed(s, now=0.0)
    join(s, "a", "h1", now=0.0)
    storage = host("storage-seed", kind="seed")
    for now in (5.0, 10.0, 15.0):
        s.heartbeat(storage, uploads=0, now=now)

    assert s.expire(now=15.0) == []  # exactly ttl since h1 was seen: still alive
    assert s.expire(now=16.0) == ["h1"]
    assert "a" not in s.peers

    for n in range(2, 6):
        schedule = join(s, f"p{n}", f"h{n}", now=16.0)
        assert "a" not in ids(schedule)
        assert "seed" in ids(schedule)


def test_an_expired_host_is_not_offered_even_after_it_heartbeats_again() -> None:
    s = new_core(host_ttl=15.0)
    add_seed(s, now=0.0)
    join(s, "a", "h1", now=0.0)
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0)], now=0.0)
    s.heartbeat(host("h1"), uploads=0, now=20.0)
    assert s.expire(now=20.0) == ["storage-seed"]
    assert "seed" not in s.peers

    assert s.heartbeat(host("storage-seed", kind="seed"), uploads=0, now=21.0) is False
    schedule, _ = s.reschedule(task_id=T, peer_id="a", now=21.0)
    assert "seed" not in ids(schedule)
    assert ids(join(s, "b", "h2", now=22.0)) == {"a"}


def test_expire_of_the_last_peer_forgets_the_task() -> None:
    s = new_core(host_ttl=1.0)
    add_seed(s)
    assert s.expire(now=5.0) == ["storage-seed"]
    assert s.task_info(T) == (None, [])
    _, effects = s.register(task_id=T, peer_id="a", host=host("h1"), now=5.0)
    assert effects == [TriggerSeed(T)]


def test_leave_of_a_whole_host_removes_all_its_peers() -> None:
    s = new_core()
    add_seed(s, task=T)
    add_seed(s, task=T2, peer="seed2")
    join(s, "a", "h1", task=T)
    join(s, "a2", "h1", task=T2)
    join(s, "b", "h2", task=T)

    s.leave("h1", None)
    assert "a" not in s.peers
    assert "a2" not in s.peers
    assert s.heartbeat(host("h1"), uploads=0, now=1.0) is False
    assert "a" not in ids(join(s, "c", "h3", task=T))
    assert "a2" not in ids(join(s, "c2", "h3", task=T2))
    assert "b" in s.peers


def test_leave_of_some_peers_keeps_the_host() -> None:
    s = new_core()
    add_seed(s, task=T)
    join(s, "a", "h1", task=T)
    join(s, "a2", "h1", task=T2)
    s.leave("h1", ["a"])
    assert "a" not in s.peers
    assert "a2" in s.peers
    assert s.heartbeat(host("h1"), uploads=0, now=1.0) is True


def test_leave_cannot_remove_a_peer_of_another_host() -> None:
    s = new_core()
    join(s, "a", "h1")
    s.leave("h2", ["a"])
    assert "a" in s.peers


# -- piece reports, results, task info -----------------------------------------------------


def test_a_piece_out_of_range_is_a_bad_request() -> None:
    s = new_core()
    add_seed(s)
    with pytest.raises(SwarmflyError, match="piece 4 out of range") as caught:
        s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(4, digest(4))], now=1.0)
    assert caught.value.code == "bad_request"
    assert caught.value.path == "data.pieces"


def test_a_conflicting_digest_is_a_conflict() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    with pytest.raises(SwarmflyError, match="digest differs") as caught:
        s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0, digest(99))], now=1.0)
    assert caught.value.code == "conflict"
    assert s.task_info(T)[1][0] == digest(0)


def test_the_same_digest_may_be_reported_again() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0, digest(0))], now=1.0)


def test_a_piece_without_any_known_digest_is_a_conflict() -> None:
    s = new_core()
    s.register(task_id=T, peer_id="src", host=host("s"), now=0, content=CONTENT)
    join(s, "a", "h1")
    with pytest.raises(SwarmflyError, match="no digest yet") as caught:
        s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(2)], now=1.0)
    assert caught.value.code == "conflict"


def test_a_child_may_report_pieces_without_digest_once_known() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    s.report_pieces(
        task_id=T, peer_id="a", pieces=[PieceReport(n, parent_id="seed") for n in range(4)], now=1
    )
    s.result(task_id=T, peer_id="a", success=True, now=2.0)


def test_pieces_of_an_unregistered_peer_are_not_found() -> None:
    s = new_core()
    add_seed(s)
    with pytest.raises(SwarmflyError, match="not registered") as caught:
        s.report_pieces(task_id=T, peer_id="ghost", pieces=[PieceReport(0)], now=1.0)
    assert caught.value.code == "not_found"
    with pytest.raises(SwarmflyError, match="not registered"):
        s.report_pieces(task_id=T2, peer_id="seed", pieces=[PieceReport(0)], now=1.0)


def test_success_with_too_few_pieces_is_a_conflict() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0), PieceReport(1)], now=1.0)
    with pytest.raises(SwarmflyError, match="reported 2 of 4 pieces") as caught:
        s.result(task_id=T, peer_id="a", success=True, now=2.0)
    assert caught.value.code == "conflict"
    s.result(task_id=T, peer_id="a", success=False, now=3.0)


def test_task_info_lists_digests_with_none_for_unknown() -> None:
    s = new_core()
    s.register(
        task_id=T, peer_id="src", host=host("s", kind="seed"), now=0, content=CONTENT, seed=True
    )
    s.report_pieces(
        task_id=T,
        peer_id="src",
        pieces=[PieceReport(0, digest(0)), PieceReport(2, digest(2))],
        now=1,
    )
    content, digests = s.task_info(T)
    assert content == CONTENT
    assert digests == [digest(0), None, digest(2), None]


def test_task_info_of_an_unknown_or_contentless_task_is_empty() -> None:
    s = new_core()
    assert s.task_info(T) == (None, [])
    join(s, "a", "h1")
    assert s.task_info(T) == (None, [])


def test_content_can_arrive_with_a_piece_report() -> None:
    s = new_core()
    join(s, "a", "h1")
    s.seed_unavailable(T)
    s.reschedule(task_id=T, peer_id="a", now=1.0)
    s.report_pieces(
        task_id=T, peer_id="a", pieces=[PieceReport(0, digest(0))], now=2.0, content=CONTENT
    )
    assert s.task_info(T) == (CONTENT, [digest(0), None, None, None])


def test_schedule_to_dict_shape() -> None:
    s = new_core()
    add_seed(s)
    body = schedule_message(join(s, "a", "h1"), None, None).to_dict()
    assert body["action"] == "parents"
    assert body["task"] == {
        "content_length": CONTENT.content_length,
        "piece_length": CONTENT.piece_length,
        "piece_count": CONTENT.piece_count,
    }
    assert [p["peer_id"] for p in body["parents"]] == ["seed"]
    assert "retry_after_ms" not in body


def test_an_ipv6_host_address_is_bracketed() -> None:
    s = new_core()
    s.register(
        task_id=T, peer_id="seed", host=HostSpec("s", "fd00::1", 80, "seed"), now=0, seed=True
    )
    (parent,) = join(s, "a", "h1").parents
    assert parent.address == "http://[fd00::1]:80"


# -- bad nodes: piece cost far above the parent's mean -------------------------------------


def _report_costs(s: Scheduler, child: str, parent: str, costs: list[int]) -> None:
    s.report_pieces(
        task_id=T,
        peer_id=child,
        pieces=[PieceReport(n % 4, parent_id=parent, cost_ms=c) for n, c in enumerate(costs)],
        now=1.0,
    )


@pytest.mark.parametrize(
    ("costs", "bad"),
    [
        ([10, 10, 10, 500], True),  # 500 > 20 x 10
        ([10, 10, 10, 201], True),
        ([10, 10, 10, 150], False),
        ([10, 10, 10, 200], False),
        ([500], False),  # one sample says nothing
        ([10, 10, 10, 500, 10], False),  # a later normal piece clears it
    ],
)
def test_a_parent_whose_last_piece_cost_is_far_above_its_mean_is_not_offered(
    costs: list[int], bad: bool
) -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    join(s, "c", "h3")
    _report_costs(s, "c", "a", costs)  # c fetched pieces from a at these costs
    offered = "a" in ids(join(s, "b", "h2", now=2.0))
    assert offered is not bad


def test_a_slow_piece_from_the_seed_never_sends_a_child_to_the_origin() -> None:
    # CI saw a mirror pull read one piece twice from the registry: the seed's cost on a
    # loaded machine rose far above its mean, and the only source was "bad".
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    costs = [10, 10, 10, 3000]  # pieces 0 and 1 over and over: the seed alone holds 2 and 3
    s.report_pieces(
        task_id=T,
        peer_id="a",
        pieces=[PieceReport(n % 2, parent_id="seed", cost_ms=c) for n, c in enumerate(costs)],
        now=1.0,
    )
    schedule = join(s, "b", "h2", now=2.0)
    assert schedule.action == "parents"
    assert "seed" in ids(schedule)


# -- found bugs ------------------------------------------------------------------------------


def test_a_child_does_not_wait_forever_for_a_corrupt_only_source() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    join(s, "b", "h2")
    # a reports the seed corrupt: a goes to the origin itself, then finishes and leaves.
    schedule, _ = s.reschedule(task_id=T, peer_id="a", now=1.0, bad_parents=[("seed", "corrupt")])
    assert schedule.action == "back_to_source"
    s.leave("h1", None)

    actions = {s.reschedule(task_id=T, peer_id="b", now=2.0 + i)[0].action for i in range(100)}
    assert actions != {"wait"}


def test_a_seed_is_the_last_of_a_childs_parents_while_normal_peers_have_pieces() -> None:
    s = new_core(candidate_parents=3, evaluator=ranked("seed", "a", "b", "c"))
    add_seed(s)
    for n, peer in enumerate("abc"):
        join(s, peer, f"h{n}")
        s.report_pieces(task_id=T, peer_id=peer, pieces=[PieceReport(n)], now=1.0)
    # The evaluator prefers the seed; still, two normal peers, and the seed last (the child
    # holds as much as they do: not a laggard, given more).
    join(s, "child", "h9", now=2.0)
    s.report_pieces(task_id=T, peer_id="child", pieces=[PieceReport(3)], now=2.0)
    schedule, _ = s.reschedule(task_id=T, peer_id="child", now=2.5)
    assert [p.peer_id for p in schedule.parents] == ["a", "b", "seed"]
    s.leave("h0", None)
    s.leave("h1", None)
    s.leave("h2", None)
    schedule, _ = s.reschedule(task_id=T, peer_id="child", now=3.0)
    assert ids(schedule) == {"seed"}, "with the holders gone, the seed alone"


# -- a storage fleet: rendezvous homes, the next seed, taking over -------------------------

STORAGES = ["storage-a", "storage-b", "storage-c"]


def fleet(now: float = 0.0) -> Scheduler:
    s = new_core()
    for name in STORAGES:
        s.heartbeat(host(name, kind="seed"), uploads=0, now=now)
    return s


def test_the_seed_of_a_task_is_its_rendezvous_home_among_live_storages() -> None:
    s = fleet()
    tasks = [hashlib.sha256(f"t{n}".encode()).hexdigest() for n in range(30)]
    chosen = {}
    for n, task in enumerate(tasks):
        _, effects = s.register(task_id=task, peer_id=f"p{n}", host=host("h1"), now=0.0)
        assert effects == [TriggerSeed(task, rendezvous(task, STORAGES)[0])]
        chosen[task] = effects[0].host_id
    assert set(chosen.values()) == set(STORAGES), "every instance seeds some tasks"


def test_a_storage_that_refuses_passes_the_task_to_the_next_in_order() -> None:
    s = fleet()
    order = rendezvous(T, STORAGES)
    _, effects = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    assert effects == [TriggerSeed(T, order[0])]
    assert s.seed_unavailable(T, order[0], now=0.1) == [TriggerSeed(T, order[1])]
    assert s.seed_unavailable(T, order[1], now=0.2) == [TriggerSeed(T, order[2])]
    assert s.seed_unavailable(T, order[2], now=0.3) == []
    assert s.reschedule(task_id=T, peer_id="a", now=0.4)[0].action == "back_to_source"


def seed_on(s: Scheduler, storage: str, now: float, pieces: range) -> None:
    s.register(
        task_id=T, peer_id=f"seed-{storage}", host=host(storage, kind="seed"), now=now,
        content=CONTENT, seed=True,
    )  # fmt: skip
    s.report_pieces(
        task_id=T, peer_id=f"seed-{storage}",
        pieces=[PieceReport(n, digest(n)) for n in pieces], now=now,
    )  # fmt: skip


def test_a_seed_its_children_cannot_reach_is_replaced_by_the_next_storage() -> None:
    s = fleet()
    order = rendezvous(T, STORAGES)
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    seed_on(s, order[0], 0.5, range(2))
    parents = ids(s.reschedule(task_id=T, peer_id="a", now=1.0)[0])
    assert parents == {f"seed-{order[0]}"}
    schedule, effects = s.reschedule(
        task_id=T, peer_id="a", now=6.0, bad_parents=[(f"seed-{order[0]}", "failed")]
    )
    assert effects == [TriggerSeed(T, order[1])], "unreachable and silent for a heartbeat"
    assert schedule.action == "wait", "it waits for the next seed, not the origin"


def test_a_seed_whose_heartbeats_stop_is_replaced_by_the_next_storage() -> None:
    s = new_core(host_ttl=3.0)
    order = rendezvous(T, STORAGES)
    for name in STORAGES:
        s.heartbeat(host(name, kind="seed"), uploads=0, now=0.0)
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    seed_on(s, order[0], 0.5, range(1))
    for name in order[1:]:
        s.heartbeat(host(name, kind="seed"), uploads=0, now=4.0)
    s.heartbeat(host("h1"), uploads=0, now=4.0)
    assert s.expire(now=4.0) == [order[0]]
    _, effects = s.reschedule(task_id=T, peer_id="a", now=4.1)
    assert effects == [TriggerSeed(T, order[1])]


def test_a_seed_taking_over_is_told_who_holds_what_the_swarm_has() -> None:
    s = fleet()
    order = rendezvous(T, STORAGES)
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    s.register(task_id=T, peer_id="b", host=host("h2"), now=0.0)
    seed_on(s, order[0], 0.1, range(4))
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(0), PieceReport(1)], now=0.2)
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(0)], now=0.2)
    s.reschedule(task_id=T, peer_id="a", now=6.0, bad_parents=[(f"seed-{order[0]}", "failed")])
    schedule, effects = s.register(
        task_id=T, peer_id="next", host=host(order[1], kind="seed"), now=6.1, seed=True
    )
    assert schedule.action == "back_to_source"
    assert ids(schedule) == {"a"}, "b holds nothing a does not: one holder covers the swarm"
    assert effects == []


def test_a_new_home_asked_to_seed_copies_the_live_storage_that_holds_the_task() -> None:
    """The fleet grew and a preheat asks the task's new home to seed it: the storage that
    holds it whole is listed, so the new home copies it instead of reading the origin."""
    s = fleet()
    old = rendezvous(T, STORAGES)[0]
    seed_on(s, old, 0.0, range(4))
    s.heartbeat(host("storage-new", kind="seed"), uploads=0, now=1.0)
    schedule, _ = s.register(
        task_id=T, peer_id="new", host=host("storage-new", kind="seed"), now=1.1, seed=True
    )
    assert schedule.action == "back_to_source"
    assert ids(schedule) == {f"seed-{old}"}


def test_dropping_a_partitions_tasks_keeps_the_hosts() -> None:
    s = fleet()
    join(s, "a", "h1", task=T)
    join(s, "b", "h1", task=T2)
    s.drop_tasks([T])
    assert set(s.tasks) == {T2} and set(s.peers) == {"b"}
    assert {"h1", *STORAGES} <= set(s.hosts)
    assert s.heartbeat(host("h1"), uploads=0, now=1.0) is True


def swarm_with_seed(children: str) -> tuple[Scheduler, list[str], str]:
    """A seed with every piece, a normal peer "z" with half of them, and children using both."""
    s = fleet()
    order = rendezvous(T, STORAGES)
    seed_on(s, order[0], 0.0, range(4))
    s.register(task_id=T, peer_id="z", host=host("hz"), now=0.0, pieces=range(2))
    for child in children:
        schedule = join(s, child, f"h{child}", now=0.1)
        assert {f"seed-{order[0]}", "z"} <= ids(schedule)
    return s, order, f"seed-{order[0]}"


def test_one_child_that_cannot_reach_the_seed_does_not_replace_it_for_the_others() -> None:
    s, order, seed = swarm_with_seed("ab")
    _, effects = s.reschedule(task_id=T, peer_id="a", now=6.3, bad_parents=[(seed, "failed")])
    assert effects == []
    assert seed in ids(s.reschedule(task_id=T, peer_id="b", now=6.4)[0])
    _, effects = s.reschedule(task_id=T, peer_id="b", now=6.5, bad_parents=[(seed, "failed")])
    assert effects == [TriggerSeed(T, order[1])]


def test_a_piece_the_seed_delivers_clears_the_doubt() -> None:
    s, order, seed = swarm_with_seed("abc")
    s.reschedule(task_id=T, peer_id="a", now=6.3, bad_parents=[(seed, "failed")])
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(2, parent_id=seed)], now=6.4)
    _, effects = s.reschedule(task_id=T, peer_id="b", now=6.5, bad_parents=[(seed, "failed")])
    assert effects == [], "one report since the seed last delivered"
    _, effects = s.reschedule(task_id=T, peer_id="c", now=6.6, bad_parents=[(seed, "failed")])
    assert effects == [TriggerSeed(T, order[1])]


def test_a_seed_that_still_heartbeats_is_kept_whatever_its_children_say() -> None:
    s, order, seed = swarm_with_seed("ab")
    s.heartbeat(host(order[0], kind="seed"), uploads=0, now=6.0)
    for n, child in enumerate("ab"):
        now = 6.1 + n / 10
        _, effects = s.reschedule(task_id=T, peer_id=child, now=now, bad_parents=[(seed, "failed")])
        assert effects == []
    assert seed in ids(join(s, "c", "hc", now=6.5))
    _, effects = s.reschedule(task_id=T, peer_id="c", now=11.5)
    assert effects == [TriggerSeed(T, order[1])], "silent for a heartbeat since: it died"


# -- trust: only the task's trusted reader sets content and digests ------------------------

WHOLE = TaskContent(CONTENT.content_length, CONTENT.piece_length, CONTENT.piece_count,
                    digest="sha256:" + "ab" * 32)  # fmt: skip
FORGED = TaskContent(5 * MiB, 4 * MiB, 2)


def seat_seed(s: Scheduler, content: TaskContent = CONTENT, pieces: range = range(0)) -> None:
    """The storage host the scheduler asks seeds the task and reports ``pieces``."""
    _, effects = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    assert effects == [TriggerSeed(T, None)]
    s.register(
        task_id=T, peer_id="seed", host=host("st", kind="seed"), now=0.1, content=content, seed=True
    )
    s.report_pieces(
        task_id=T, peer_id="seed", pieces=[PieceReport(n, digest(n)) for n in pieces], now=0.2
    )


def test_a_forger_registering_first_sets_neither_content_nor_digests() -> None:
    s = new_core()
    s.register(task_id=T, peer_id="forger", host=host("evil"), now=0.0, content=FORGED, seed=True)
    s.report_pieces(task_id=T, peer_id="forger", pieces=[PieceReport(0, digest(99))], now=0.1)
    assert s.task_info(T) == (None, [])
    s.register(
        task_id=T, peer_id="seed", host=host("st", kind="seed"), now=0.2, content=CONTENT, seed=True
    )
    s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(0, digest(0))], now=0.3)
    assert s.task_info(T) == (CONTENT, [digest(0), None, None, None])
    assert s.peers["forger"].pieces == set()  # nothing it holds can be verified


def test_a_second_storage_host_does_not_take_a_live_seeds_seat() -> None:
    s = new_core()
    seat_seed(s, pieces=range(1))
    s.register(
        task_id=T, peer_id="rogue", host=host("st2", kind="seed"), now=1.0, content=CONTENT,
        seed=True, pieces=[1, 2, 3],
    )  # fmt: skip
    s.report_pieces(task_id=T, peer_id="rogue", pieces=[PieceReport(1, digest(91))], now=1.1)
    assert s.task_info(T)[1] == [digest(0), None, None, None]


def test_a_restarted_schedulers_first_storage_announce_takes_the_free_seat() -> None:
    s = new_core()
    join(s, "a", "h1")  # asks a seed nobody is
    s.register(
        task_id=T, peer_id="seed", host=host("st", kind="seed"), now=1.0, content=CONTENT,
        seed=True, pieces=range(4),
    )  # fmt: skip
    s.report_pieces(
        task_id=T, peer_id="seed", pieces=[PieceReport(n, digest(n)) for n in range(4)], now=1.1
    )
    assert s.task_info(T)[1] == [digest(n) for n in range(4)]


def test_while_homes_are_not_known_the_cache_that_announces_takes_the_seat() -> None:
    """A scheduler that just started (or took the task's partition over) has heard some
    storage instances only, or not yet from the task's seed: the home it would choose may
    not be the one holding the task. It chooses none, the peers wait, and the instance
    holding the task takes the seat when it announces, and keeps it once homes are known."""
    s = new_core()
    home, *others = rendezvous(T, STORAGES)
    for name in others:  # the home's heartbeat has not come yet
        s.heartbeat(host(name, kind="seed"), uploads=0, now=0.0)
    s.homes_known = False
    schedule, effects = s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)
    assert (schedule.action, effects) == ("wait", [TriggerSeed(T)])
    assert s.reschedule(task_id=T, peer_id="a", now=0.3)[0].action == "wait"
    seed_on(s, home, 0.5, range(2))  # its heartbeat came: it announces what it holds
    assert s.task_info(T)[1] == [digest(0), digest(1), None, None], "the seat's digests count"
    s.homes_known = True
    assert s.seed_unavailable(T, None, now=1.0) == [], "served already: no home is asked"
    assert ids(s.reschedule(task_id=T, peer_id="a", now=1.1)[0]) == {f"seed-{home}"}
    s.report_pieces(
        task_id=T, peer_id=f"seed-{home}", pieces=[PieceReport(n, digest(n)) for n in (2, 3)],
        now=1.2,
    )  # fmt: skip
    assert s.task_info(T)[1] == [digest(n) for n in range(4)], "it kept the seat"


def test_while_homes_are_not_known_a_task_nobody_holds_waits_for_its_home() -> None:
    s = new_core()
    s.heartbeat(host("storage-b", kind="seed"), uploads=0, now=0.0)
    s.homes_known = False
    assert s.register(task_id=T, peer_id="a", host=host("h1"), now=0.0)[1] == [TriggerSeed(T)]
    assert s.seed_unavailable(T, None, now=0.2) == [TriggerSeed(T)], "still not known: wait"
    for name in STORAGES:
        s.heartbeat(host(name, kind="seed"), uploads=0, now=0.5)
    s.homes_known = True
    assert s.seed_unavailable(T, None, now=1.0) == [TriggerSeed(T, rendezvous(T, STORAGES)[0])]


def test_a_peer_sent_back_to_source_is_trusted() -> None:
    s = new_core()
    join(s, "a", "h1")
    s.seed_unavailable(T)
    assert s.reschedule(task_id=T, peer_id="a", now=1.0)[0].action == "back_to_source"
    s.report_pieces(
        task_id=T, peer_id="a", pieces=[PieceReport(0, digest(0))], now=2.0, content=CONTENT
    )
    assert s.task_info(T) == (CONTENT, [digest(0), None, None, None])


def lend(s: Scheduler, number: int, child: str, now: float = 1.0) -> None:
    from swarmfly.services.scheduler.core import Lending

    s.report_pieces(task_id=T, peer_id="seed", pieces=[], now=now, lent=[Lending(number, child)])


def test_a_lent_childs_digest_is_provisional_until_the_seed_reads_the_piece() -> None:
    s = new_core()
    seat_seed(s, WHOLE, range(2))
    join(s, "b", "h2")
    lend(s, 3, "a")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(3))], now=1.1)
    assert s.task_info(T)[1][3] == digest(3)
    assert s.provisional(T) == [3]
    s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(3, digest(3))], now=2.0)
    assert s.provisional(T) == []
    assert "a" in ids(s.reschedule(task_id=T, peer_id="b", now=2.1)[0])


def test_a_lent_child_that_lied_is_refuted_and_never_offered_again() -> None:
    s = new_core()
    seat_seed(s, WHOLE, range(2))
    join(s, "b", "h2")
    lend(s, 3, "a")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(93))], now=1.1)
    s.report_pieces(task_id=T, peer_id="b", pieces=[PieceReport(3, parent_id="a")], now=1.2)
    s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(3, digest(3))], now=2.0)
    assert s.task_info(T)[1][3] == digest(3)
    assert s.provisional(T) == []
    assert "a" not in ids(s.reschedule(task_id=T, peer_id="b", now=2.1)[0])
    assert 3 not in s.peers["b"].pieces  # it took the piece on the liar's word


def test_a_childs_digest_for_a_piece_not_lent_to_it_is_not_heard() -> None:
    s = new_core()
    seat_seed(s, WHOLE, range(1))
    lend(s, 3, "b")
    join(s, "b", "h2")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(93))], now=1.1)
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(2, digest(92))], now=1.1)
    assert s.task_info(T)[1][1:] == [None, None, None]
    assert s.peers["a"].pieces == set()


def test_without_a_whole_file_digest_a_lent_childs_word_is_not_taken() -> None:
    s = new_core()
    seat_seed(s, CONTENT, range(1))
    lend(s, 3, "a")
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(3))], now=1.1)
    assert s.task_info(T)[1][3] is None


def test_a_lent_childs_report_may_arrive_before_its_seeds_word() -> None:
    s = new_core()
    seat_seed(s, WHOLE, range(1))
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(3))], now=1.0)
    assert s.task_info(T)[1][3] is None
    lend(s, 3, "a", now=1.1)
    assert s.task_info(T)[1][3] == digest(3)
    assert 3 in s.peers["a"].pieces


def test_a_loan_told_before_its_child_came_back_stands_for_when_it_does() -> None:
    """A partition moved: its new holder hears the seed again first, which tells it its
    loans once, and the child a moment later. The child's digest of its lent piece still
    counts, so a seed taking the task over copies the piece from it rather than reading it
    from the origin again."""
    s = new_core()
    s.register(
        task_id=T, peer_id="seed", host=host("st", kind="seed"), now=0.0, content=WHOLE,
        seed=True, pieces=range(2),
    )  # fmt: skip
    s.report_pieces(
        task_id=T, peer_id="seed", pieces=[PieceReport(n, digest(n)) for n in range(2)], now=0.0
    )
    lend(s, 3, "a", now=0.1)  # "a" has not registered here yet
    s.register(task_id=T, peer_id="a", host=host("h1"), now=0.2, pieces=range(2))
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(3))], now=0.3)
    assert s.provisional(T) == [3]
    assert s.peers["a"].pieces == {0, 1, 3}
    s.leave("st", None)  # the seed left
    schedule, _ = s.register(
        task_id=T, peer_id="next", host=host("st2", kind="seed"), now=0.5, content=WHOLE,
        seed=True,
    )  # fmt: skip
    assert (schedule.action, ids(schedule)) == ("back_to_source", {"a"})


def test_only_the_seed_says_what_it_lent() -> None:
    s = new_core()
    seat_seed(s, WHOLE, range(1))
    from swarmfly.services.scheduler.core import Lending

    s.report_pieces(task_id=T, peer_id="a", pieces=[], now=1.0, lent=[Lending(3, "a")])
    s.report_pieces(task_id=T, peer_id="a", pieces=[PieceReport(3, digest(93))], now=1.1)
    assert s.task_info(T)[1][3] is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["register", "pieces", "result", "lend", "seat"]),
            st.integers(0, 5),
            st.sampled_from([None, CONTENT, WHOLE, FORGED]),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_a_forging_host_never_changes_a_trusted_digest(
    moves: list[tuple[str, int, TaskContent | None, bool]],
) -> None:
    """Whatever an ordinary member sends under its own ids, the digests and the content are
    the trusted reader's, and any other digest stands only provisionally, for a piece the
    seed lent, where a whole-file digest will still catch it."""
    s = new_core(rng=random.Random(0))
    seat_seed(s, WHOLE, range(2))
    forger = "forger"
    for step, (move, number, content, flag) in enumerate(moves):
        now = 1.0 + step
        try:
            if move == "register":
                s.register(task_id=T, peer_id=forger, host=host("evil"), now=now,
                           content=content, seed=flag, pieces=[number])  # fmt: skip
            elif move == "pieces":
                s.report_pieces(
                    task_id=T, peer_id=forger, now=now, content=content,
                    pieces=[PieceReport(number, digest(90 + number) if flag else None,
                                        parent_id="seed" if flag else None)],
                )  # fmt: skip
            elif move == "result":
                s.result(task_id=T, peer_id=forger, success=flag, now=now)
            elif move == "lend":
                from swarmfly.services.scheduler.core import Lending

                s.report_pieces(task_id=T, peer_id=forger, pieces=[], now=now,
                                lent=[Lending(number, forger)])  # fmt: skip
            else:  # a second storage host, run by the forger, asks for the seat
                s.register(task_id=T, peer_id=forger + "-st", host=host("evil-st", kind="seed"),
                           now=now, content=content, seed=True, pieces=[number])  # fmt: skip
        except SwarmflyError:
            pass
        content_now, digests = s.task_info(T)
        assert content_now == WHOLE
        assert digests[:2] == [digest(0), digest(1)]
        assert all(d is None for d in digests[2:])
        assert s.provisional(T) == []


def test_piece_digests_are_kept_compactly_and_read_back_as_hex() -> None:
    digests = PieceDigests()
    assert digests.get(0) is None and 5 not in digests
    digests[5] = digest(5)
    assert (digests.get(5), digests[5], 5 in digests) == (digest(5), digest(5), True)
    assert digests.get(4) is None and digests.get(6) is None, "no digest between or after"
    with pytest.raises(KeyError):
        digests[4]
    for bad in ("ab", "0" * 64, "zz" * 32):
        with pytest.raises(ValueError):
            digests[1] = bad


def test_a_report_of_a_digest_no_data_has_is_refused_whole() -> None:
    s = new_core()
    add_seed(s)
    join(s, "a", "h1")
    reports = [PieceReport(0, digest(0)), PieceReport(1, "0" * 64)]
    with pytest.raises(SwarmflyError, match="not a sha256 digest"):
        s.report_pieces(task_id=T, peer_id="seed", pieces=reports, now=1.0)


def test_a_digest_page_ends_at_the_last_digest_known() -> None:
    """What a schedule or a report's reply pushes (``digests_from``): nothing when nothing is
    known from there, and never a trail of unknowns."""
    digests = PieceDigests()
    digests[2] = digest(2)
    digests[5] = "00" * 31 + "01"  # ends in zero bytes: still a digest
    assert digests.page(0, 10) == [None, None, digest(2), None, None, "00" * 31 + "01"]
    assert digests.page(3, 2) == []  # 3 and 4 are unknown; 5 is past the limit
    assert digests.page(6, 10) == []
    s = new_core()
    s.register(
        task_id=T, peer_id="seed", host=host("s", kind="seed"), now=0.0, content=CONTENT, seed=True
    )
    s.report_pieces(task_id=T, peer_id="seed", pieces=[PieceReport(1, digest(1))], now=1.0)
    assert s.digest_page(T, 0, 256) == ([None, digest(1)], [])
    assert s.digest_page(T, 0, 1) == ([], [])
    assert s.digest_page(T, 3, 256) == ([], [])  # the last piece: nothing known
    assert s.digest_page(T2, 0, 256) == ([], [])  # no such task


def test_expiry_takes_the_hosts_silent_longest_and_a_beat_or_a_registration_renews() -> None:
    """Hosts are kept in the order they were last seen: expiry stops at the first live one
    (its cost is the dead hosts, not every host)."""
    s = new_core(host_ttl=10.0)
    for n, name in enumerate(("a", "b", "c", "d")):
        s.heartbeat(host(name), 0, now=float(n))
    s.heartbeat(host("a"), 0, now=4.0)
    s.register(task_id=T, peer_id="pb", host=host("b"), now=5.0)
    s.heartbeat(host("st", kind="seed"), 0, now=5.0)
    assert s.expire(now=12.5) == ["c"]  # seen at 2; d at 3 is not yet 10 s silent
    assert list(s.hosts) == ["d", "a", "b", "st"]
    assert s.seed_hosts() == ["st"]
    assert s.expire(now=16.0) == ["d", "a", "b", "st"] and s.seed_hosts() == []


def test_a_child_behind_the_swarm_is_offered_more_parents() -> None:
    s = new_core(candidate_parents=4)
    add_seed(s)
    for n in range(12):
        join(s, f"p{n}", f"h{n}")
        s.report_pieces(
            task_id=T, peer_id=f"p{n}", pieces=[PieceReport(k) for k in range(2)], now=0.5
        )
    behind = join(s, "late", "h-late", now=1.0)
    assert len(behind.parents) == 4 * LAGGARD_PARENTS, "holds none of what they hold"
    s.report_pieces(task_id=T, peer_id="late", pieces=[PieceReport(k) for k in range(2)], now=1.5)
    level, _ = s.reschedule(task_id=T, peer_id="late", now=2.0)
    assert len(level.parents) == 4, "as far as the swarm: the configured count"
    one = new_core(candidate_parents=1)
    add_seed(one)
    for n in range(3):
        join(one, f"p{n}", f"h{n}")
        one.report_pieces(task_id=T, peer_id=f"p{n}", pieces=[PieceReport(0)], now=0.5)
    assert len(join(one, "late", "h-late", now=1.0).parents) == 1, "a chain stays a chain"
