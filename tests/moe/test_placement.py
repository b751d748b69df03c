"""Placement maps: identity layouts, derived maps, validation, per-rank compute layouts and the home <-> replica
exchange plan."""

from __future__ import annotations

import random

import pytest
from dualmoe.errors import PlacementError
from dualmoe.moe.placement import (
    Placement,
    home_rank,
    remote_experts_by_rank,
    replica_exchange,
    slot_layout,
    slots_are_home_local,
)


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
def test_placement_layout_orders_homes_then_replicas_within_each_rank(seed: int) -> None:
    rng = random.Random(seed)
    p_ranks = rng.choice([1, 2, 4])
    e = p_ranks * rng.randint(1, 4)
    s = e + p_ranks * rng.randint(0, 3)
    pl = _random_placement(rng, e, s, p_ranks)
    per_home, per_rank = e // p_ranks, s // p_ranks
    for r in range(p_ranks):
        layout = slot_layout(pl, r)
        assert sorted(layout.position_of_slot) == list(range(s))
        assert all(pos // per_rank == slot // per_rank for slot, pos in enumerate(layout.position_of_slot))
        assert list(layout.group_of_position) == sorted(layout.group_of_position)
        assert layout.replica_experts == remote_experts_by_rank(pl)[r]
        assert all(x // per_home != r for x in layout.replica_experts)
        for slot in range(r * per_rank, (r + 1) * per_rank):
            expert = pl.physical_to_logical[slot]
            group = layout.group_of_position[layout.position_of_slot[slot] % per_rank]
            want = expert - r * per_home if expert // per_home == r else per_home + layout.replica_experts.index(expert)
            assert group == want, (slot, expert, group)
    assert slot_layout(pl, 0).any_remote == (not slots_are_home_local(pl))


def _simulate_refresh(pl: Placement, plans: list) -> list[dict[int, int]]:
    """Apply the exchanges on plain lists: rank r sends home rows (expert ids); returns replica row -> expert."""
    p_ranks, per_home = pl.num_ranks, pl.num_experts // pl.num_ranks
    outbox = {}
    for r, plan in enumerate(plans):
        rows = [r * per_home + i for i in plan.send_index]
        start = 0
        for dest, n in enumerate(plan.send_counts):
            outbox[(r, dest)] = rows[start:start + n]
            start += n
    filled = []
    for q, plan in enumerate(plans):
        assert [len(outbox[(src, q)]) for src in range(p_ranks)] == list(plan.recv_counts)
        received = [x for src in range(p_ranks) for x in outbox[(src, q)]]
        filled.append(dict(zip(plan.recv_index, received, strict=True)))
    return filled


@pytest.mark.parametrize("seed", range(20))
def test_placement_replica_exchange_refresh_and_adjoint_match_direct_copies(seed: int) -> None:
    """Refresh fills every replica row with its expert's home row; the reverse exchange adds every replica's
    gradient into its expert's home row exactly once."""
    rng = random.Random(seed)
    p_ranks = rng.choice([1, 2, 4])
    e = p_ranks * rng.randint(1, 4)
    s = e + p_ranks * rng.randint(0, 3)
    pl = _random_placement(rng, e, s, p_ranks)
    plans = [replica_exchange(pl, r) for r in range(p_ranks)]
    assert all(plan.fills_all for plan in plans)
    for q, filled in enumerate(_simulate_refresh(pl, plans)):
        assert filled == dict(enumerate(remote_experts_by_rank(pl)[q]))
    totals, per_home = [0] * e, e // p_ranks
    for r, plan in enumerate(plans):  # adjoint: rank r receives one gradient row per send_index entry
        for i in plan.send_index:
            totals[r * per_home + i] += 1
    assert totals == [sum(x in held for held in remote_experts_by_rank(pl)) for x in range(e)]
    assert plans[0].any_rows == any(remote_experts_by_rank(pl))


def test_placement_replica_exchange_after_a_switch_sends_only_new_replicas() -> None:
    old = Placement.identity(8, 12, num_ranks=4)  # rank r holds replicas of expert 2(r+1) mod 8
    assert remote_experts_by_rank(old) == ((2,), (4,), (6,), (0,))
    new = Placement.from_physical_to_logical([0, 1, 2, 2, 3, 6, 4, 5, 6, 6, 7, 3], num_experts=8, num_ranks=4)
    plans = [replica_exchange(new, r, held=old) for r in range(4)]
    assert remote_experts_by_rank(new) == ((2,), (6,), (6,), (3,))
    assert _simulate_refresh(new, plans) == [{}, {0: 6}, {}, {0: 3}]  # ranks 0 and 2 keep what they held
    assert not any(replica_exchange(old, r, held=old).any_rows for r in range(4))
