"""Migration-aware planning (`dualmoe.moe.eplb.plan_placement`): budget, skip rule, keeping experts in
place, relabelling, plan fields, determinism, bad inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dualmoe.errors import PlacementError
from dualmoe.moe import eplb_migrate
from dualmoe.moe.eplb import Plan, _balancedness_bound, balancedness, gpu_load, plan_placement, rebalance_experts
from dualmoe.moe.eplb_migrate import relabel

from tests.moe.test_eplb import check_invariants, zipf_load

torch.set_num_threads(1)

GLOBAL = dict(num_slots=80, num_nodes=3, num_ranks=8, num_groups=8)  # 64 experts, global policy
HIER = dict(num_slots=80, num_nodes=2, num_ranks=8, num_groups=8)  # 64 experts, hierarchical


def drifted(load_LE: torch.Tensor, drift: float, seed: int) -> torch.Tensor:
    """Mix a share `drift` of every layer's load with the load of shuffled experts."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(load_LE.shape[1], generator=gen) for _ in range(load_LE.shape[0])])
    return (1 - drift) * load_LE + drift * load_LE.gather(1, perm)


def deployed(cfg: dict, skew: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(current placement planned for an old load, new load after 10 % drift), 4 layers x 64 experts."""
    old = zipf_load(4, 64, skew, seed=seed, tokens=65536)
    current, _, _ = rebalance_experts(old, cfg["num_slots"], cfg["num_groups"], cfg["num_nodes"], cfg["num_ranks"])
    return current, drifted(old, 0.1, seed + 1)


def assert_plan_consistent(plan: Plan, current: torch.Tensor, load: torch.Tensor, cfg: dict) -> None:
    new = plan.physical_to_logical
    check_invariants(load, (new, plan.logical_to_physical, plan.replica_count), cfg["num_slots"], 1, 1,
                     cfg["num_ranks"])
    assert torch.equal(plan.changed, new != current)
    assert plan.num_copies == int(plan.changed.sum()) == sum(len(m) for m in plan.moves)
    for layer, moves in enumerate(plan.moves):
        for slot, expert in moves:
            assert new[layer, slot] == expert != current[layer, slot]
    assert torch.equal(plan.kept, ~plan.changed.any(-1))
    assert torch.allclose(plan.balancedness_before, balancedness(current, load, cfg["num_ranks"]))
    assert torch.allclose(plan.balancedness_after, balancedness(new, load, cfg["num_ranks"]))


@pytest.mark.parametrize("cfg", [GLOBAL, HIER], ids=["global", "hierarchical"])
@pytest.mark.parametrize("max_moves", [0, 1, 4, 12, None])
def test_plan_placement_respects_move_budget(cfg: dict, max_moves: int | None) -> None:
    current, load = deployed(cfg)
    plan = plan_placement(load, current, max_moves=max_moves, copy_cost=0.0, **cfg)
    assert_plan_consistent(plan, current, load, cfg)
    if max_moves is not None:
        assert bool((plan.copies_per_layer <= max_moves).all())
    if max_moves == 0:
        assert torch.equal(plan.physical_to_logical, current) and plan.num_copies == 0
    else:
        assert plan.num_copies > 0
    assert bool((plan.balancedness_after >= plan.balancedness_before).all())


@pytest.mark.parametrize("cfg", [GLOBAL, HIER], ids=["global", "hierarchical"])
def test_plan_placement_skip_rule_keeps_layers_with_small_gain(cfg: dict) -> None:
    current, load = deployed(cfg)
    moved = plan_placement(load, current, **cfg)
    gain = moved.balancedness_after - moved.balancedness_before
    assert bool((gain > 0).all())
    threshold = float(gain.median())
    plan = plan_placement(load, current, min_gain=threshold, **cfg)
    assert torch.equal(plan.kept, gain < threshold)
    assert bool((plan.copies_per_layer[plan.kept] == 0).all())
    assert torch.equal(plan.physical_to_logical[~plan.kept], moved.physical_to_logical[~plan.kept])
    none = plan_placement(load, current, min_gain=1.0, **cfg)
    assert none.num_copies == 0 and bool(none.kept.all())


@pytest.mark.parametrize("cfg", [GLOBAL, HIER], ids=["global", "hierarchical"])
def test_plan_placement_keeps_a_placement_that_fits_its_load(cfg: dict) -> None:
    load = zipf_load(4, 64, 0.8, seed=4, tokens=65536)
    current, _, _ = rebalance_experts(load, cfg["num_slots"], cfg["num_groups"], cfg["num_nodes"], cfg["num_ranks"])
    plan = plan_placement(load, current, **cfg)
    assert plan.num_copies == 0 and torch.equal(plan.physical_to_logical, current)


def test_plan_placement_copies_far_fewer_slots_than_a_fresh_plan() -> None:
    current, load = deployed(GLOBAL, skew=1.0, seed=7)
    fresh, _, _ = rebalance_experts(load, 80, 8, 3, 8)
    plan = plan_placement(load, current, **GLOBAL)
    assert plan.num_copies * 3 <= int((fresh != current).sum())

    def overall(placement: torch.Tensor) -> float:
        load_LG = gpu_load(placement, load, 8)
        return float(load_LG.mean(-1).sum() / load_LG.max(-1).values.sum())

    assert overall(plan.physical_to_logical) >= overall(fresh) - 0.01
    assert overall(plan.physical_to_logical) > overall(current) + 0.01


def test_plan_placement_copy_cost_trades_balance_for_copies() -> None:
    current, load = deployed(GLOBAL, skew=1.0, seed=3)
    plans = [plan_placement(load, current, copy_cost=c, **GLOBAL) for c in (0.0, 0.2, 1.0)]
    copies = [p.num_copies for p in plans]
    after = [float(p.balancedness_after.mean()) for p in plans]
    assert copies[0] >= copies[1] >= copies[2] and copies[0] > copies[2]
    assert after[0] >= after[1] >= after[2]


def test_plan_placement_hierarchical_keeps_groups_on_their_nodes() -> None:
    # Whatever wins, every group sits on one node. Sticky moves stay inside nodes; a new node split comes
    # only with a fresh plan, which wins at copy_cost=0 but not at the default cost here.
    current, load = deployed(HIER, skew=1.2, seed=5)

    def node_of_expert(placement: torch.Tensor) -> torch.Tensor:
        node_S = torch.arange(80) // 40
        return torch.stack([torch.zeros(64, dtype=torch.int64).scatter_(0, row, node_S) for row in placement])

    for copy_cost in (0.0, 0.2):
        plan = plan_placement(load, current, copy_cost=copy_cost, **HIER)
        check_invariants(load, (plan.physical_to_logical, plan.logical_to_physical, plan.replica_count),
                         HIER["num_slots"], HIER["num_groups"], HIER["num_nodes"], HIER["num_ranks"])
        assert bool((plan.balancedness_after > plan.balancedness_before).all())
        same_nodes = (node_of_expert(plan.physical_to_logical) == node_of_expert(current)).all(-1)
        assert bool(same_nodes.all()) == (copy_cost > 0)


def test_relabel_recovers_a_permuted_placement_exactly() -> None:
    load = zipf_load(3, 64, 0.8, seed=9)
    current, _, _ = rebalance_experts(load, 80, 8, 2, 8)
    gen = torch.Generator().manual_seed(0)
    per_gpu = current.view(3, 2, 4, 10)
    shuffled = per_gpu.flip(1)[:, :, torch.randperm(4, generator=gen)]  # swap nodes, permute GPUs in nodes
    shuffled = shuffled[..., torch.randperm(10, generator=gen)].reshape(3, 80)  # and slots inside GPUs
    assert not torch.equal(shuffled, current)
    assert torch.equal(relabel(shuffled, current, num_gpus=8, num_nodes=2), current)


def test_relabel_keeps_gpu_contents_and_lowers_copies() -> None:
    old = zipf_load(4, 64, 0.8, seed=1, tokens=65536)
    new_load = drifted(old, 0.2, 2)
    current, _, _ = rebalance_experts(old, 80, 8, 3, 8)
    fresh, _, _ = rebalance_experts(new_load, 80, 8, 3, 8)
    relabelled = relabel(fresh, current, num_gpus=8, num_nodes=1)
    as_sets = lambda p: sorted(tuple(sorted(g)) for g in p.view(8, 10).tolist())  # noqa: E731
    for layer in range(4):
        assert as_sets(relabelled[layer]) == as_sets(fresh[layer])
    assert int((relabelled != current).sum()) < int((fresh != current).sum())


def test_plan_placement_without_current_is_the_fresh_plan() -> None:
    load = zipf_load(2, 64, 0.8, seed=2)
    plan = plan_placement(load, None, **GLOBAL)
    fresh, _, _ = rebalance_experts(load, 80, 8, 3, 8)
    assert torch.equal(plan.physical_to_logical, fresh)
    assert plan.num_copies == 2 * 80 and not bool(plan.kept.any())


def test_plan_placement_is_deterministic_and_accepts_placement_objects() -> None:
    current, load = deployed(GLOBAL)

    @dataclasses.dataclass
    class Deployed:
        physical_to_logical: torch.Tensor

    first = plan_placement(load, current, max_moves=6, **GLOBAL)
    again = plan_placement(load.clone(), Deployed(current.clone()), max_moves=6, **GLOBAL)
    assert torch.equal(first.physical_to_logical, again.physical_to_logical)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.num_copies = 0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("current", "kwargs", "match"),
    [
        (torch.zeros(4, 79, dtype=torch.int64), {}, r"current: expected a \[4, 80\] physical->logical map"),
        (torch.zeros(4, 80), {}, r"current: expected an integer tensor, got dtype torch.float32"),
        (torch.full((4, 80), 64), {}, r"current: logical expert ids must lie in \[0, 64\)"),
        (torch.zeros(4, 80, dtype=torch.int64), {}, r"current: layer 0 has no slot for logical expert 1"),
        (None, {"max_moves": -1}, r"max_moves=-1: must be None or an int >= 0"),
        (None, {"min_gain": -0.1}, r"min_gain=-0.1: must be a number >= 0"),
        (None, {"num_slots": 81}, r"num_slots=81: must be a multiple of num_ranks \(8\)"),
    ],
)
def test_plan_placement_rejects_bad_inputs(current: torch.Tensor | None, kwargs: dict, match: str) -> None:
    load = zipf_load(4, 64, 0.8, seed=0)
    with pytest.raises(PlacementError, match=match):
        plan_placement(load, current, **{**GLOBAL, **kwargs})


@pytest.mark.parametrize("cfg", [GLOBAL, HIER], ids=["global", "hierarchical"])
def test_plan_placement_skipping_hopeless_fresh_plans_changes_no_plan(cfg: dict, monkeypatch) -> None:
    """The fresh plan is made only for layers where it could win (balancedness bound, >= 25 % copies):
    on 3 loads x 3 settings the plans equal those made with the fresh plan in every layer."""
    plans = {}
    for fresh_min_copies in (eplb_migrate._FRESH_MIN_COPIES, -1e9):
        monkeypatch.setattr(eplb_migrate, "_FRESH_MIN_COPIES", fresh_min_copies)
        for seed in range(3):
            current, load = deployed(cfg, skew=0.6 + 0.3 * seed, seed=20 + seed)
            for kwargs in (dict(copy_cost=0.1), dict(copy_cost=0.1, max_moves=12), dict(copy_cost=1e-4)):
                plan = plan_placement(load, current, **kwargs, **cfg).physical_to_logical
                plans.setdefault((seed, str(kwargs)), []).append(plan)
    for key, (skipped, full) in plans.items():
        assert torch.equal(skipped, full), key


@pytest.mark.parametrize("cfg", [GLOBAL, HIER, dict(GLOBAL, num_slots=64)], ids=["global", "hier", "no-redundant"])
def test_balancedness_bound_holds_for_fresh_plans(cfg: dict) -> None:
    for seed in range(4):
        load = zipf_load(4, 64, 0.5 + 0.3 * seed, seed=seed)
        shape = dict(num_slots=cfg["num_slots"], num_groups=cfg["num_groups"], num_nodes=cfg["num_nodes"],
                     num_gpus=cfg["num_ranks"])
        bound = _balancedness_bound(load, **shape)
        fresh = rebalance_experts(load, cfg["num_slots"], cfg["num_groups"], cfg["num_nodes"], cfg["num_ranks"])[0]
        assert bool((balancedness(fresh, load, cfg["num_ranks"]) <= bound + 1e-12).all())
        assert bool((bound <= 1.0).all())


def test_plans_are_ordinary_tensors_outside_inference_mode() -> None:
    """Planning runs under torch.inference_mode(); what it returns must still be usable in place."""
    current, load = deployed(GLOBAL)
    plan = plan_placement(load, current, **GLOBAL)
    maps = rebalance_experts(load, 80, 8, 3, 8)
    for t in (plan.physical_to_logical, plan.logical_to_physical, plan.replica_count, plan.changed, *maps):
        assert not t.is_inference()
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)
