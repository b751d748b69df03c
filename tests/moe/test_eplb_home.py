"""Home-aware planning (`plan_placement(..., home_of=, remote_cost=)`): remote slots never increase over
`remote_cost=0`, the objective trade stays within its stated bound, balanced home layouts stay at home."""

from __future__ import annotations

import pytest
import torch
from dualmoe.errors import PlacementError
from dualmoe.moe.eplb import balancedness, home_ranks, plan_placement, rebalance_experts, remote_slots
from dualmoe.moe.eplb_home import home_swaps
from dualmoe.moe.placement import Placement

from tests.moe.test_eplb import check_invariants, zipf_load
from tests.moe.test_eplb_migration import drifted

torch.set_num_threads(1)

EP4 = dict(num_slots=80, num_nodes=1, num_ranks=4, num_groups=1)  # the EP=4 benchmark shape, 64 experts
GLOBAL = dict(num_slots=80, num_nodes=3, num_ranks=8, num_groups=8)  # 64 experts, global policy
HIER = dict(num_slots=80, num_nodes=2, num_ranks=8, num_groups=8)  # 64 experts, hierarchical


def identity(cfg: dict, num_layers: int, num_experts: int = 64) -> torch.Tensor:
    p2l = Placement.identity(num_experts, cfg["num_slots"], num_ranks=cfg["num_ranks"]).physical_to_logical
    return torch.tensor(p2l).expand(num_layers, -1).contiguous()


def objective(placement: torch.Tensor, current: torch.Tensor | None, load: torch.Tensor, cfg: dict,
              copy_cost: float) -> torch.Tensor:
    """[L] balancedness - copy_cost * changed / S (every slot counts as changed without a deployed map)."""
    changed = placement.shape[1] if current is None else (placement != current).sum(-1)
    return balancedness(placement, load, cfg["num_ranks"]) - copy_cost * changed / cfg["num_slots"]


@pytest.mark.parametrize("cfg", [EP4, GLOBAL, HIER], ids=["ep4", "global", "hier"])
@pytest.mark.parametrize("start", ["identity", "deployed", "none"])
def test_plan_placement_remote_cost_never_adds_remote_slots(cfg: dict, start: str) -> None:
    """On 3 loads x 2 copy costs x 2 remote costs: per layer no more remote slots than remote_cost=0, and
    balancedness - copy_cost * changed / S at most remote_cost * (remote slots saved) / S below it."""
    home = home_ranks(64, cfg["num_ranks"])
    saved = 0
    for seed in range(3):
        old = zipf_load(3, 64, 0.6 + 0.2 * seed, seed=seed, tokens=32768)
        load = drifted(old, 0.1, seed + 7)
        current = {"identity": identity(cfg, 3), "none": None,
                   "deployed": rebalance_experts(old, cfg["num_slots"], cfg["num_groups"], cfg["num_nodes"],
                                                 cfg["num_ranks"])[0]}[start]
        for copy_cost in (1e-4, 0.1):
            base = plan_placement(load, current, copy_cost=copy_cost, **cfg)
            base_remote = remote_slots(base.physical_to_logical, home, cfg["num_ranks"])
            for remote_cost in (0.05, 0.3):
                plan = plan_placement(load, current, copy_cost=copy_cost, home_of=home, remote_cost=remote_cost, **cfg)
                new = plan.physical_to_logical
                check_invariants(load, (new, plan.logical_to_physical, plan.replica_count), cfg["num_slots"], 1, 1,
                                 cfg["num_ranks"])
                remote = remote_slots(new, home, cfg["num_ranks"])
                assert (remote <= base_remote).all(), (seed, copy_cost, remote_cost, remote, base_remote)
                bound = remote_cost * (base_remote - remote) / cfg["num_slots"]
                loss = (objective(base.physical_to_logical, current, load, cfg, copy_cost)
                        - objective(new, current, load, cfg, copy_cost))
                assert (loss <= bound + 1e-9).all(), (seed, copy_cost, remote_cost, loss, bound)
                if current is not None:
                    assert torch.equal(plan.changed, new != current)
                    assert (plan.balancedness_after >= plan.balancedness_before - 1e-12).all()
                saved += int((base_remote - remote).sum())
    assert saved > 0  # the remote cost brings slots home somewhere in the battery


@pytest.mark.parametrize("redundant_per_rank", [0, 4])
def test_plan_placement_keeps_a_balanced_identity_placement_at_home(redundant_per_rank: int) -> None:
    """Uniform load: the identity placement (home blocks, then replicas of the next rank's experts) is
    balanced, so it is kept as is; without redundant slots a plan from nothing puts every expert home."""
    cfg = dict(EP4, num_slots=64 + 4 * redundant_per_rank)
    load = torch.full((2, 64), 100.0)
    current = identity(cfg, 2)
    home = home_ranks(64, 4)
    assert (balancedness(current, load, 4) == 1.0).all()
    plan = plan_placement(load, current, copy_cost=1e-4, home_of=True, remote_cost=0.05, **cfg)
    assert plan.num_copies == 0 and torch.equal(plan.physical_to_logical, current)
    assert (remote_slots(plan.physical_to_logical, home, 4) == 4 * redundant_per_rank).all()
    if redundant_per_rank:  # a fresh plan picks replica counts without homes (16 replicas of rank 0's experts)
        return
    fresh = plan_placement(load, None, home_of=home, remote_cost=0.05, **cfg).physical_to_logical
    assert (balancedness(fresh, load, 4) == 1.0).all()
    assert (remote_slots(fresh, home, 4) == 0).all()  # every expert on its home rank

def test_plan_placement_remote_cost_zero_or_no_homes_is_the_plain_plan() -> None:
    load = zipf_load(3, 64, 0.8, seed=5)
    current = identity(EP4, 3)
    plain = plan_placement(load, current, **EP4).physical_to_logical
    for kwargs in (dict(home_of=True, remote_cost=0.0), dict(home_of=None, remote_cost=0.5)):
        assert torch.equal(plan_placement(load, current, **kwargs, **EP4).physical_to_logical, plain)
    by_flag = plan_placement(load, current, home_of=True, remote_cost=0.1, **EP4).physical_to_logical
    by_tensor = plan_placement(load, current, home_of=home_ranks(64, 4).int(), remote_cost=0.1, **EP4)
    assert torch.equal(by_flag, by_tensor.physical_to_logical)


def test_plan_placement_home_aware_respects_budget_and_groups_on_nodes() -> None:
    old = zipf_load(3, 64, 1.0, seed=3, tokens=32768)
    current = rebalance_experts(old, 80, 8, 2, 8)[0]
    load = drifted(old, 0.2, 11)
    for max_moves in (0, 3, 10):
        plan = plan_placement(load, current, max_moves=max_moves, home_of=True, remote_cost=0.3, **HIER)
        assert (plan.copies_per_layer <= max_moves).all()
    plan = plan_placement(load, current, home_of=True, remote_cost=0.3, **HIER)
    node_S = torch.arange(80) // 40
    for layer in range(3):  # every group's slots on one node (8 groups of 8 experts, 2 nodes)
        group_S = plan.physical_to_logical[layer] // 8
        for group in range(8):
            assert node_S[group_S == group].unique().numel() == 1


def test_home_swaps_only_raise_the_objective_and_keep_replicas_apart() -> None:
    load = zipf_load(4, 64, 0.6, seed=9)
    placement = rebalance_experts(load, 80, 1, 1, 4)[0]
    home = home_ranks(64, 4)
    for remote_cost in (0.0, 0.01, 1.0):
        out = home_swaps(placement, load, home, num_gpus=4, remote_cost=remote_cost)
        score_in = balancedness(placement, load, 4) - remote_cost * remote_slots(placement, home, 4) / 80
        score_out = balancedness(out, load, 4) - remote_cost * remote_slots(out, home, 4) / 80
        assert (score_out >= score_in - 1e-12).all()
        assert torch.equal(out.sort(-1).values, placement.sort(-1).values)  # swaps keep replica counts
        per_gpu = out.view(-1, 20).sort(-1).values
        assert not (per_gpu[:, 1:] == per_gpu[:, :-1]).any()
        if remote_cost == 0.0:
            assert torch.equal(out, placement)  # no strict gain without a remote cost: nothing moves
    assert (remote_slots(out, home, 4) < remote_slots(placement, home, 4)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(home_of=torch.zeros(63, dtype=torch.int64)), r"home_of: expected a \[64\] tensor"),
        (dict(home_of=torch.zeros(64)), "home_of: expected an integer tensor"),
        (dict(home_of=torch.full((64,), 4)), r"home_of: home ranks must lie in \[0, 4\)"),
        (dict(home_of=True, remote_cost=-0.1), "remote_cost=-0.1: must be a number >= 0"),
    ],
)
def test_plan_placement_rejects_bad_home_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        plan_placement(torch.ones(1, 64), None, **kwargs, **EP4)


def test_home_ranks_needs_a_divisible_expert_count() -> None:
    with pytest.raises(PlacementError, match=r"home_of=True: the number of logical experts \(10\) must be divisible"):
        plan_placement(torch.ones(1, 10), None, num_slots=12, num_nodes=1, num_ranks=4, num_groups=1, home_of=True)


def test_home_swaps_one_iteration_takes_several_disjoint_swaps_and_raises_the_objective() -> None:
    """One iteration swaps on several GPU pairs at once; the objective (balancedness - remote cost) rises
    in every layer that changes, replica counts stay, no GPU gets a second replica of an expert."""
    load = zipf_load(4, 64, 0.6, seed=13)
    placement = rebalance_experts(load, 96, 1, 1, 8)[0]  # 12 slots per GPU, most replicas off their home
    home = home_ranks(64, 8)
    out = home_swaps(placement, load, home, num_gpus=8, remote_cost=0.05, max_iters=1)
    changed = (out != placement).sum(-1)
    assert int(changed.max()) >= 6  # three swaps or more in a layer after one iteration
    score_in = balancedness(placement, load, 8) - 0.05 * remote_slots(placement, home, 8) / 96
    score_out = balancedness(out, load, 8) - 0.05 * remote_slots(out, home, 8) / 96
    assert ((score_out > score_in) | (changed == 0)).all()
    assert torch.equal(out.sort(-1).values, placement.sort(-1).values)
    per_gpu = out.view(-1, 12).sort(-1).values
    assert not (per_gpu[:, 1:] == per_gpu[:, :-1]).any()


@pytest.mark.parametrize("max_moves", [0, 2, 5, 11])
def test_home_swaps_keep_the_budget_with_several_swaps_per_iteration(max_moves: int) -> None:
    load = zipf_load(4, 64, 0.6, seed=14)
    current = rebalance_experts(load, 96, 1, 1, 8)[0]
    out = home_swaps(current, load, home_ranks(64, 8), num_gpus=8, current_LS=current, copy_cost=1e-4,
                     remote_cost=0.3, max_moves=max_moves)
    assert ((out != current).sum(-1) <= max_moves).all()
    if max_moves >= 5:
        assert int((out != current).sum()) > 0
