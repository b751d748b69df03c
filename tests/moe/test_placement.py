"""Placement maps: identity layouts, derived maps, validation, and the home <-> slot exchange plan."""

from __future__ import annotations

import random

import pytest
from dualmoe.errors import PlacementError
from dualmoe.moe.placement import Placement, home_rank, slot_exchange, slots_are_home_local


def _check_consistent(p: Placement) -> None:
    assert sum(p.replica_count) == p.num_slots
    for expert in range(p.num_experts):
        row = p.logical_to_physical[expert]
        slots = [s for s in row if s >= 0]
        assert len(slots) == p.replica_count[expert] >= 1
        assert all(p.physical_to_logical[s] == expert for s in slots)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("extra", [0, 1, 3])
def test_placement_identity_homes_first_then_replicas_of_next_rank(num_ranks: int, extra: int) -> None:
    e = 16
    s = e + extra * num_ranks
    p = Placement.identity(e, s, num_ranks=num_ranks)
    _check_consistent(p)
    home = e // num_ranks
    for rank in range(num_ranks):
        on_rank = p.experts_on_rank(rank)
        assert on_rank[:home] == tuple(range(rank * home, (rank + 1) * home))
        if num_ranks > 1:
            assert not set(on_rank[home:]) & set(on_rank[:home]), "replica beside its original"
    assert slots_are_home_local(p) == (extra == 0 or num_ranks == 1)


def test_placement_identity_single_rank_wraps_replicas() -> None:
    p = Placement.identity(4, 10)
    assert p.physical_to_logical == (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)
    assert p.replica_count == (3, 3, 2, 2)
    assert p.logical_to_physical[0] == (0, 4, 8) and p.logical_to_physical[3] == (3, 7, -1)


def test_placement_from_dict_round_trip_and_changed_slots() -> None:
    p = Placement.from_physical_to_logical([3, 2, 1, 0, 0, 1], num_experts=4, num_ranks=2)
    assert Placement.from_dict(p.to_dict()) == p
    q = Placement.identity(4, 6, num_ranks=2)
    assert p.changed_slots(q) == tuple(s for s in range(6) if p.physical_to_logical[s] != q.physical_to_logical[s])


def test_placement_rank_loads_split_evenly_over_replicas() -> None:
    p = Placement.from_physical_to_logical([0, 1, 0, 2], num_experts=3, num_ranks=2)
    assert p.rank_loads([10.0, 4.0, 6.0]) == (9.0, 11.0)
    assert p.balancedness([10.0, 4.0, 6.0]) == pytest.approx(10.0 / 11.0)
    assert p.balancedness([0.0, 0.0, 0.0]) == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"physical_to_logical": (0, 1, 1, 1), "logical_to_physical": ((0,), (1,), (-1,)), "replica_count": (1, 3, 0)},
     r"logical expert 2 has no slot"),
    ({"physical_to_logical": (0, 1, 5), "logical_to_physical": ((0,), (1,), (2,)), "replica_count": (1, 1, 1)},
     r"slot 2 holds expert 5; valid experts are 0\.\.2"),
    ({"physical_to_logical": (0, 1, 2, 0), "logical_to_physical": ((0, 3), (1, -1), (2, -1)),
      "replica_count": (1, 1, 1)}, r"replica_count\[0\]=1 but 2 slots hold expert 0"),
    ({"physical_to_logical": (0, 1, 2, 0), "logical_to_physical": ((0, 2), (1, -1), (3, -1)),
      "replica_count": (2, 1, 1)}, r"logical_to_physical\[0\]=\[0, 2\] disagrees"),
])
def test_placement_rejects_inconsistent_maps(kwargs: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        Placement(num_experts=3, num_ranks=1, **kwargs)


def test_placement_rejects_slots_not_divisible_by_ranks() -> None:
    with pytest.raises(PlacementError, match=r"has 5 slots; need >= num_experts \(4\) and a multiple of num_ranks"):
        Placement.from_physical_to_logical([0, 1, 2, 3, 0], num_experts=4, num_ranks=2)
    with pytest.raises(PlacementError, match=r"num_experts=6 must be divisible by the EP size 4"):
        home_rank(0, num_experts=6, num_ranks=4)


def _random_placement(rng: random.Random, e: int, s: int, p: int) -> Placement:
    p2l = list(range(e)) + [rng.randrange(e) for _ in range(s - e)]
    rng.shuffle(p2l)
    return Placement.from_physical_to_logical(p2l, num_experts=e, num_ranks=p)


@pytest.mark.parametrize("seed", range(20))
def test_placement_exchange_refresh_and_adjoint_match_direct_copies(seed: int) -> None:
    """Simulate the all-to-all on plain lists: refresh fills every slot with its expert's home row,
    and the reverse exchange adds every slot's gradient into its expert's home row exactly once."""
    rng = random.Random(seed)
    p_ranks = rng.choice([1, 2, 4])
    e = p_ranks * rng.randint(1, 4)
    s = e + p_ranks * rng.randint(0, 3)
    pl = _random_placement(rng, e, s, p_ranks)
    per_home, per_rank = e // p_ranks, s // p_ranks
    plans = [slot_exchange(pl, r) for r in range(p_ranks)]
    # refresh: rank r sends home rows ("expert id") to each dest in order
    outbox = {}
    for r, plan in enumerate(plans):
        rows = [r * per_home + i for i in plan.home_index]
        start = 0
        for dest, n in enumerate(plan.send_counts):
            outbox[(r, dest)] = rows[start:start + n]
            start += n
    for q, plan in enumerate(plans):
        received = [x for src in range(p_ranks) for x in outbox[(src, q)]]
        assert [len(outbox[(src, q)]) for src in range(p_ranks)] == list(plan.recv_counts)
        slots = [None] * per_rank
        for local, expert in zip(plan.slot_index, received, strict=True):
            slots[local] = expert
        assert slots == list(pl.experts_on_rank(q))
    # adjoint: each slot contributes once to its home
    totals = [0] * e
    for q, plan in enumerate(plans):
        for local in plan.slot_index:
            totals[pl.physical_to_logical[q * per_rank + local]] += 1
    assert totals == list(pl.replica_count)


def test_placement_exchange_subset_moves_only_named_slots() -> None:
    pl = Placement.identity(8, 12, num_ranks=4)
    changed = (2, 7)
    plans = [slot_exchange(pl, r, slots=changed) for r in range(4)]
    assert sum(len(x.slot_index) for x in plans) == 2
    assert plans[0].slot_index == (2,) and plans[2].slot_index == (1,)
