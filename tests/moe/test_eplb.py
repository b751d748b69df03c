"""EPLB planner (`dualmoe.moe.eplb.rebalance_experts`): invariants, exact optimum on tiny cases, never worse
than the reference's greedy steps, reference output format, determinism, bad inputs.

The oracles live here and are deliberately slow and simple: a brute force over every placement, and
`greedy_baseline`, the three greedy steps of deepseek-ai/EPLB `eplb.py` (LPT groups -> nodes, replicate
the heaviest per-replica expert, LPT replicas -> GPUs) written as plain Python loops.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from dualmoe.errors import PlacementError
from dualmoe.moe.eplb import balancedness, gpu_load, logical_to_physical_map, rebalance_experts, replica_count_of

torch.set_num_threads(1)


def zipf_load(num_layers: int, num_experts: int, skew: float, seed: int, tokens: int = 8192) -> torch.Tensor:
    """[L, E] token counts: Zipf(skew) popularity over a random permutation of experts, multinomial draw."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** skew
        popularity = popularity[torch.randperm(num_experts, generator=gen)]
        draws = torch.multinomial(popularity / popularity.sum(), tokens, replacement=True, generator=gen)
        rows.append(draws.bincount(minlength=num_experts).to(torch.float64))
    return torch.stack(rows)


def lpt(weights: list[float], num_packs: int, keys: list[int] | None = None) -> list[int]:
    """Pack of every item: heaviest first (stable) to the lightest open pack (lowest index on ties; the
    first `num_packs` items open one pack each); with `keys`, a pack already holding an item's key is used
    only when no other pack is open (the planner's no-duplicate rule)."""
    per_pack = len(weights) // num_packs
    load, count = [0.0] * num_packs, [0] * num_packs
    held: list[set[int]] = [set() for _ in range(num_packs)]
    pack = [0] * len(weights)
    for rank, item in enumerate(sorted(range(len(weights)), key=lambda i: -weights[i])):
        open_packs = [p for p in range(num_packs) if count[p] < per_pack]
        if keys is not None and any(keys[item] not in held[p] for p in open_packs):
            open_packs = [p for p in open_packs if keys[item] not in held[p]]
        best = rank if rank < num_packs else min(open_packs, key=lambda p: (load[p], p))
        pack[item] = best
        load[best] += weights[item]
        count[best] += 1
        if keys is not None:
            held[best].add(keys[item])
    return pack


def greedy_baseline(weight: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                    allow_duplicates: bool) -> torch.Tensor:
    """The reference's three greedy steps; without `allow_duplicates`, under the planner's rule (at most
    one replica of an expert per GPU: counts capped at the GPUs of the domain, LPT skips holding GPUs)."""
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    out = []
    for w in weight.tolist():
        num_experts = len(w)
        group_size = num_experts // num_groups
        group_node = lpt([sum(w[g * group_size:(g + 1) * group_size]) for g in range(num_groups)], num_nodes)
        slots_per_node, gpus_per_node = num_slots // num_nodes, num_gpus // num_nodes
        per_gpu = num_slots // num_gpus
        cap = gpus_per_node if not allow_duplicates else num_slots
        cap = max(cap, -(-slots_per_node // (num_experts // num_nodes)))
        row = [0] * num_slots
        for node in range(num_nodes):
            groups = [g for g in range(num_groups) if group_node[g] == node]
            experts = [g * group_size + k for g in groups for k in range(group_size)]
            count = [1] * len(experts)
            for _ in range(slots_per_node - len(experts)):
                open_ = [i for i in range(len(experts)) if count[i] < cap]
                best = max(open_, key=lambda i: (w[experts[i]] / count[i], -i))
                count[best] += 1
            replicas = [i for i in range(len(experts)) for _ in range(count[i])]
            shares = [w[experts[i]] / count[i] for i in replicas]
            gpu = lpt(shares, gpus_per_node, None if allow_duplicates else replicas)
            filled = [0] * gpus_per_node
            for r, g in enumerate(gpu):
                row[node * slots_per_node + g * per_gpu + filled[g]] = experts[replicas[r]]
                filled[g] += 1
        out.append(row)
    return torch.tensor(out, dtype=torch.int64)


def brute_force_min_max(w: list[float], num_slots: int, num_gpus: int) -> float:
    """Lowest possible max GPU load over every placement without two replicas of an expert on a GPU."""
    per_gpu = num_slots // num_gpus
    subsets = list(itertools.combinations(range(len(w)), per_gpu))
    best = float("inf")
    for choice in itertools.combinations_with_replacement(subsets, num_gpus):
        count = [0] * len(w)
        for subset in choice:
            for e in subset:
                count[e] += 1
        if min(count) == 0:
            continue
        best = min(best, max(sum(w[e] / count[e] for e in subset) for subset in choice))
    return best


def check_invariants(weight: torch.Tensor, out: tuple[torch.Tensor, ...], num_slots: int, num_groups: int,
                     num_nodes: int, num_gpus: int) -> None:
    physical_to_logical, logical_to_physical, count = out
    num_layers, num_experts = weight.shape
    assert physical_to_logical.dtype == logical_to_physical.dtype == count.dtype == torch.int64
    assert physical_to_logical.shape == (num_layers, num_slots)
    assert count.shape == (num_layers, num_experts)
    assert logical_to_physical.shape == (num_layers, num_experts, int(count.max()))
    assert bool((count >= 1).all()) and bool((count.sum(-1) == num_slots).all())
    assert torch.equal(replica_count_of(physical_to_logical, num_experts), count)
    for layer in range(num_layers):
        for expert in range(num_experts):
            slots = logical_to_physical[layer, expert]
            c = int(count[layer, expert])
            assert bool((slots[c:] == -1).all())
            assert slots[:c].tolist() == sorted(torch.nonzero(physical_to_logical[layer] == expert).flatten().tolist())
    hierarchical = num_groups % num_nodes == 0
    domain_gpus = num_gpus // num_nodes if hierarchical else num_gpus
    per_gpu = num_slots // num_gpus
    slots_per_domain = num_slots // (num_nodes if hierarchical else 1)
    if -(-slots_per_domain // (num_experts // (num_nodes if hierarchical else 1))) <= domain_gpus and per_gpu <= (
            num_experts // (num_nodes if hierarchical else 1)):
        gpus = physical_to_logical.view(num_layers, num_gpus, per_gpu)
        for layer in range(num_layers):
            for g in range(num_gpus):
                assert len(set(gpus[layer, g].tolist())) == per_gpu, f"duplicate replica on layer {layer} GPU {g}"
    if hierarchical:  # every group sits on one node
        group_size = num_experts // num_groups
        node_of_slot = torch.arange(num_slots) // (num_slots // num_nodes)
        for layer in range(num_layers):
            for g in range(num_groups):
                in_group = (physical_to_logical[layer] // group_size) == g
                assert len(set(node_of_slot[in_group].tolist())) == 1


SHAPES = [  # (num_experts, num_slots, num_groups, num_nodes, num_gpus)
    (32, 40, 8, 4, 8),  # hierarchical, DeepSeek-V3 proportions
    (32, 48, 8, 2, 8),
    (32, 40, 8, 3, 8),  # global (8 groups do not split over 3 nodes)
    (16, 16, 4, 4, 4),  # no redundancy
    (16, 32, 1, 1, 16),  # 2 slots per GPU
    (12, 24, 4, 1, 4),  # one node
    (64, 72, 8, 4, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("skew", [0.0, 1.2])
def test_rebalance_experts_invariants(shape: tuple[int, ...], skew: float) -> None:
    num_experts, num_slots, num_groups, num_nodes, num_gpus = shape
    weight = zipf_load(3, num_experts, skew, seed=num_slots)
    out = rebalance_experts(weight, num_slots, num_groups, num_nodes, num_gpus)
    check_invariants(weight, out, num_slots, num_groups, num_nodes, num_gpus)


def test_rebalance_experts_matches_brute_force_on_tiny_cases() -> None:
    rng = random.Random(0)
    cases = 0
    while cases < 60:
        num_experts, num_gpus, per_gpu = rng.randint(2, 6), rng.randint(2, 4), rng.randint(1, 3)
        num_slots = num_gpus * per_gpu
        if num_slots < num_experts or per_gpu > num_experts:
            continue
        w = [rng.choice([0.0, float(rng.randint(1, 30)), rng.random() * 10]) for _ in range(num_experts)]
        weight = torch.tensor([w], dtype=torch.float64)
        physical_to_logical, _, _ = rebalance_experts(weight, num_slots, 1, 1, num_gpus)
        ours = float(gpu_load(physical_to_logical, weight, num_gpus).max())
        assert ours == pytest.approx(brute_force_min_max(w, num_slots, num_gpus), rel=1e-12, abs=1e-12), w
        cases += 1


def test_rebalance_experts_beats_a_local_optimum_of_swaps() -> None:
    # 3 experts, 2 GPUs x 2 slots: replicating the heaviest expert (the greedy choice) gives 9.98; the
    # optimum replicates the lightest one: [0, 1 | 0, 2] -> max(1.906 + 7.654, 1.906 + 6.158) = 9.560.
    weight = torch.tensor([[3.8124, 7.6535, 6.1576]], dtype=torch.float64)
    physical_to_logical, _, count = rebalance_experts(weight, 4, 1, 1, 2)
    assert count.tolist() == [[2, 1, 1]]
    assert float(gpu_load(physical_to_logical, weight, 2).max()) == pytest.approx(1.9062 + 7.6535)


BATTERY = [  # (num_experts, num_slots, num_groups, num_nodes, num_gpus)
    (32, 40, 8, 4, 8), (32, 48, 4, 2, 8), (24, 36, 8, 3, 6), (64, 80, 8, 4, 16), (48, 64, 4, 4, 8),
    (16, 24, 4, 1, 4), (64, 72, 8, 4, 8), (32, 64, 8, 3, 32), (40, 50, 5, 5, 10), (24, 48, 6, 4, 12),
]


@pytest.mark.parametrize("shape", BATTERY)
def test_rebalance_experts_never_worse_than_greedy_baseline(shape: tuple[int, ...]) -> None:
    num_experts, num_slots, num_groups, num_nodes, num_gpus = shape
    gen = torch.Generator().manual_seed(num_slots * 7 + num_gpus)
    loads = [zipf_load(2, num_experts, skew, seed=int(num_experts * skew * 10) + num_gpus) for skew in (0.3, 0.8, 1.5)]
    loads.append(torch.randint(0, 50, (2, num_experts), generator=gen).to(torch.float64))
    loads.append(torch.rand(2, num_experts, generator=gen, dtype=torch.float64) ** 4)
    for weight in loads:
        physical_to_logical, _, _ = rebalance_experts(weight, num_slots, num_groups, num_nodes, num_gpus)
        ours = gpu_load(physical_to_logical, weight, num_gpus).max(-1).values
        base = greedy_baseline(weight, num_slots, num_groups, num_nodes, num_gpus, allow_duplicates=False)
        theirs = gpu_load(base, weight, num_gpus).max(-1).values
        assert bool((ours <= theirs * (1 + 1e-12)).all()), (ours.tolist(), theirs.tolist())


@pytest.mark.parametrize("shape", [(64, 72, 8, 4, 8), (64, 80, 8, 3, 16), (128, 160, 8, 4, 16), (64, 96, 8, 3, 8)])
def test_rebalance_experts_balances_better_than_reference_steps(shape: tuple[int, ...]) -> None:
    # Against the reference's own steps, duplicates allowed: the whole plan is at least as balanced.
    num_experts, num_slots, num_groups, num_nodes, num_gpus = shape
    for skew in (0.3, 0.8, 1.2):
        weight = zipf_load(4, num_experts, skew, seed=num_experts + int(10 * skew), tokens=65536)
        physical_to_logical, _, _ = rebalance_experts(weight, num_slots, num_groups, num_nodes, num_gpus)
        base = greedy_baseline(weight, num_slots, num_groups, num_nodes, num_gpus, allow_duplicates=True)
        ours, theirs = gpu_load(physical_to_logical, weight, num_gpus), gpu_load(base, weight, num_gpus)
        assert float(ours.mean(-1).sum() / ours.max(-1).values.sum()) >= float(
            theirs.mean(-1).sum() / theirs.max(-1).values.sum())


def test_rebalance_experts_output_format_matches_reference_semantics() -> None:
    num_experts, num_slots, num_groups, num_nodes, num_gpus = 16, 24, 4, 2, 4
    weight = zipf_load(3, num_experts, 1.0, seed=3)
    physical_to_logical, logical_to_physical, count = rebalance_experts(weight, num_slots, num_groups, num_nodes,
                                                                       num_gpus)
    # The reference builds log2phy [L, E, max count] by scattering each slot to (expert, replica rank):
    base = greedy_baseline(weight, num_slots, num_groups, num_nodes, num_gpus, allow_duplicates=True)
    base_count = replica_count_of(base, num_experts)
    width = int(base_count.max())
    log2phy = torch.full((3, num_experts, width), -1, dtype=torch.int64)
    for layer in range(3):
        seen = [0] * num_experts
        for slot, expert in enumerate(base[layer].tolist()):
            log2phy[layer, expert, seen[expert]] = slot
            seen[expert] += 1
    assert torch.equal(logical_to_physical_map(base, base_count), log2phy)  # same layout and padding
    assert logical_to_physical.shape[:2] == log2phy.shape[:2] and logical_to_physical.dtype == log2phy.dtype
    assert logical_to_physical.shape[2] == int(count.max())
    assert physical_to_logical.device.type == "cpu"


def test_rebalance_experts_is_deterministic() -> None:
    weight = zipf_load(4, 32, 0.9, seed=11)
    first = rebalance_experts(weight, 40, 8, 4, 8)
    for same in (weight.clone(), weight.to(torch.int64), weight.float()):
        again = rebalance_experts(same, 40, 8, 4, 8)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("weight", [torch.zeros(2, 16), torch.ones(2, 16), torch.full((2, 16), 7.0)])
def test_rebalance_experts_ties_are_deterministic(weight: torch.Tensor) -> None:
    first = rebalance_experts(weight, 24, 4, 2, 4)
    check_invariants(weight, first, 24, 4, 2, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, rebalance_experts(weight, 24, 4, 2, 4)))
    assert torch.equal(first[0][0], first[0][1])  # equal layers, equal plans


def test_rebalance_experts_duplicates_only_when_forced() -> None:
    # 2 GPUs x 3 slots for 2 experts: each GPU must hold some expert twice.
    weight = torch.tensor([[5.0, 1.0]])
    physical_to_logical, _, count = rebalance_experts(weight, 6, 1, 1, 2)
    assert count.sum().item() == 6 and bool((count >= 1).all())
    # 4 GPUs x 3 slots for 4 experts: the hot expert gets one replica per GPU, never two on one.
    weight = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    physical_to_logical, _, count = rebalance_experts(weight, 12, 1, 1, 4)
    assert count[0, 0].item() == 4
    for g in range(4):
        assert len(set(physical_to_logical[0, 3 * g:3 * g + 3].tolist())) == 3


def test_balancedness_is_mean_over_max_with_even_split() -> None:
    physical_to_logical = torch.tensor([[0, 1, 0, 2]])  # GPU 0: experts 0, 1; GPU 1: experts 0, 2
    weight = torch.tensor([[8.0, 2.0, 6.0]])  # expert 0 has 2 replicas: 4 each
    assert gpu_load(physical_to_logical, weight, 2).tolist() == [[6.0, 10.0]]
    assert balancedness(physical_to_logical, weight, 2).tolist() == [pytest.approx(0.8)]
    assert balancedness(physical_to_logical, torch.zeros(1, 3), 2).tolist() == [1.0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(8), 8, 1, 1, 2), r"weight: expected a 2-D \[layers, experts\] tensor, got \(8,\)"),
        ((torch.tensor([[1.0, -1.0]]), 2, 1, 1, 2), r"weight: loads must be finite and >= 0"),
        ((torch.tensor([[1.0, float("nan")]]), 2, 1, 1, 2), r"weight: loads must be finite"),
        ((torch.ones(2, 8), 10, 1, 1, 4), r"num_replicas=10: must be a multiple of num_gpus \(4\)"),
        ((torch.ones(2, 8), 4, 1, 1, 4), r"num_replicas=4: must be >= the number of logical experts \(8\)"),
        ((torch.ones(2, 8), 8, 3, 1, 4), r"num_groups=3: the number of logical experts \(8\) must be divisible"),
        ((torch.ones(2, 8), 12, 2, 2, 3), r"num_gpus=3: must be a multiple of num_nodes \(2\)"),
        ((torch.ones(2, 8), 8, 0, 1, 4), r"num_groups=0: must be an int >= 1"),
        ((torch.ones(2, 8), 8.0, 1, 1, 4), r"num_replicas=8.0: must be an int >= 1"),
    ],
)
def test_rebalance_experts_rejects_bad_inputs(args: tuple, match: str) -> None:
    with pytest.raises(PlacementError, match=match):
        rebalance_experts(*args)


@pytest.mark.parametrize("shape", [(64, 96, 8, 3, 8), (128, 160, 8, 3, 16)])
@pytest.mark.parametrize("skew", [0.3, 1.2])
def test_rebalance_experts_global_policy_reaches_mean_load(shape: tuple[int, ...], skew: float) -> None:
    # >= 10 slots per GPU: the local search brings the busiest GPU within 0.1 % of the mean.
    num_experts, num_slots, num_groups, num_nodes, num_gpus = shape
    weight = zipf_load(4, num_experts, skew, seed=5, tokens=65536)
    physical_to_logical, _, _ = rebalance_experts(weight, num_slots, num_groups, num_nodes, num_gpus)
    assert bool((balancedness(physical_to_logical, weight, num_gpus) >= 0.999).all())
