"""Where tasks live: partitions by task id, seeds and partition homes by rendezvous hashing."""

from __future__ import annotations

import hashlib
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from swarmfly.placement import partition_of, rendezvous

TASKS = [hashlib.sha256(f"task {n}".encode()).hexdigest() for n in range(4000)]
NODES = st.lists(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True), min_size=1, max_size=8)


def test_a_partition_is_the_first_64_bits_of_the_task_id_modulo_the_count() -> None:
    """The formula the contracts state, so a peer in any language routes the same way."""
    task_id = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert partition_of(task_id, 16) == 0x2D711642B726B044 % 16 == 4
    assert partition_of(task_id, 1) == 0


def test_tasks_spread_evenly_over_the_partitions() -> None:
    counts = Counter(partition_of(t, 16) for t in TASKS)
    assert sorted(counts) == list(range(16))
    assert all(0.7 * 250 < c < 1.3 * 250 for c in counts.values()), counts


@given(nodes=NODES, key=st.text(max_size=20))
def test_the_order_depends_on_the_set_only(nodes: list[str], key: str) -> None:
    order = rendezvous(key, nodes)
    assert sorted(order) == sorted(set(nodes))
    assert rendezvous(key, reversed(nodes + nodes)) == order


@given(nodes=NODES.filter(lambda n: len(set(n)) > 1), key=st.text(max_size=20))
def test_without_its_home_a_key_goes_to_its_second_and_the_rest_keeps_its_order(
    nodes: list[str], key: str
) -> None:
    order = rendezvous(key, nodes)
    assert rendezvous(key, set(nodes) - {order[0]}) == order[1:]


def test_losing_a_node_moves_only_its_own_keys() -> None:
    nodes = ["storage-a", "storage-b", "storage-c"]
    before = {t: rendezvous(t, nodes)[0] for t in TASKS}
    after = {t: rendezvous(t, nodes[:2])[0] for t in TASKS}
    moved = {t for t in TASKS if before[t] != after[t]}
    assert moved == {t for t in TASKS if before[t] == "storage-c"}


def test_a_new_node_takes_a_fair_share_from_every_other() -> None:
    nodes = ["storage-a", "storage-b", "storage-c"]
    before = {t: rendezvous(t, nodes)[0] for t in TASKS}
    after = {t: rendezvous(t, [*nodes, "storage-d"])[0] for t in TASKS}
    moved = [t for t in TASKS if before[t] != after[t]]
    assert all(after[t] == "storage-d" for t in moved)
    assert 0.2 < len(moved) / len(TASKS) < 0.3  # about a quarter
    homes = Counter(after.values())
    assert all(0.8 * 1000 < homes[n] < 1.2 * 1000 for n in [*nodes, "storage-d"]), homes


def test_a_single_node_is_home_to_everything() -> None:
    assert {rendezvous(t, ["only"])[0] for t in TASKS[:50]} == {"only"}
    assert rendezvous("x", []) == []
