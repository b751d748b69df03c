"""EPLB planner: where the physical expert slots go, from measured per-expert load (pure, vectorized).

Two entry points:

* ``rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)`` has the inputs, outputs and
  policy choice of deepseek-ai/EPLB ``eplb.py`` (physical->logical map, logical->physical map padded with
  -1, replica counts); hierarchical policy when ``num_groups % num_nodes == 0`` (groups packed to nodes,
  replicas made and packed inside each node), global otherwise (one domain of all GPUs). Slot ``s`` lives
  on GPU ``s // (num_replicas // num_gpus)``.
* ``plan_placement(load_LE, current, ...)`` plans against the deployed placement: it keeps experts where
  they are unless moving buys enough balance, relabels GPUs/nodes of a fresh plan to reuse weights,
  honours a per-layer copy budget and skips layers whose predicted gain is too small. It returns a
  frozen :class:`Plan`.

What is better than the reference: every step loops over the items of one layer only and works on all
layers at once (58 layers x 256 experts -> 288/320 slots in tens of ms instead of ~1 s); no two replicas of
one expert on one GPU unless the slot counts force it; the hierarchical policy also tries the group->node
split that minimises a lower bound on the GPU load; a local search (swaps and replica re-assignments on
the most loaded GPU) runs after the greedy packing; the result is deterministic (stable sorts, first
index on ties).

Balancedness of a layer = mean GPU load / max GPU load, where an expert's load is split evenly over its
replicas; over several layers it is sum of means / sum of maxima (vLLM's and SGLang's definition).

Legend (shape suffixes): L layers, E logical experts, S physical slots, G GPUs, N nodes, M max replicas
of one expert, K candidate group->node splits, R rows (independent sub-problems).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from dualmoe.errors import PlacementError
from dualmoe.moe.eplb_home import home_swaps, num_remote
from dualmoe.moe.eplb_migrate import choose_per_layer, relabel
from dualmoe.moe.eplb_pack import apportion, group_partitions, pack_greedy, place_exactly
from dualmoe.moe.eplb_search import local_search

__all__ = [
    "Plan",
    "balancedness",
    "gpu_load",
    "home_ranks",
    "logical_to_physical_map",
    "plan_placement",
    "rebalance_experts",
    "remote_slots",
    "replica_count_of",
]


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``num_replicas`` physical expert slots on ``num_gpus`` GPUs from per-expert load.

    Args:
        weight: [L, E] load statistics of every logical expert (tokens, an EMA, ...; any real dtype, >= 0).
        num_replicas: physical slots S per layer; a multiple of ``num_gpus`` and >= E.
        num_groups: expert groups (E % num_groups == 0 for the hierarchical policy).
        num_nodes: server nodes; hierarchical policy when ``num_groups % num_nodes == 0``.
        num_gpus: GPUs G (a multiple of ``num_nodes`` for the hierarchical policy).

    Returns:
        physical_to_logical: [L, S] int64, the logical expert of every slot (slot s on GPU s // (S/G)).
        logical_to_physical: [L, E, M] int64, the slots of every expert in ascending order, -1 padded;
            M = the largest replica count over all layers.
        replica_count: [L, E] int64, replicas of every expert (>= 1, sums to S per layer).

    Raises:
        PlacementError: a bad shape or value, or a divisibility rule broken (the message names it).
    """
    load_LE = _check_load(weight, "weight")
    _check_shape(load_LE.shape[1], num_replicas, num_groups, num_nodes, num_gpus, slots_name="num_replicas")
    with torch.inference_mode():  # ~10 % less per-op overhead; the results are cloned out of it below
        physical_to_logical, count_LE = _plan_fresh(
            load_LE, num_slots=num_replicas, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus
        )
    physical_to_logical, count_LE = physical_to_logical.clone(), count_LE.clone()
    return physical_to_logical, logical_to_physical_map(physical_to_logical, count_LE), count_LE


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A placement planned against the deployed one (all tensors on CPU).

    Attributes:
        physical_to_logical: [L, S] int64, the new logical expert of every slot.
        logical_to_physical: [L, E, M] int64, slots of every expert, ascending, -1 padded.
        replica_count: [L, E] int64, replicas of every logical expert.
        changed: [L, S] bool, slots whose logical expert changes (each needs a weight copy).
        kept: [L] bool, layers left exactly as deployed (skip rule, budget 0, or nothing worth moving).
        balancedness_before: [L] float64, mean/max GPU load of the deployed placement on the given load
            (0.0 when nothing was deployed).
        balancedness_after: [L] float64, the same for the new placement.
        num_copies: total slots that change (= ``changed.sum()``).
    """

    physical_to_logical: torch.Tensor
    logical_to_physical: torch.Tensor
    replica_count: torch.Tensor
    changed: torch.Tensor
    kept: torch.Tensor
    balancedness_before: torch.Tensor
    balancedness_after: torch.Tensor
    num_copies: int

    def __post_init__(self) -> None:
        num_layers, num_slots = self.physical_to_logical.shape
        if self.changed.shape != (num_layers, num_slots) or self.kept.shape != (num_layers,):
            raise PlacementError(
                f"Plan: changed {tuple(self.changed.shape)} / kept {tuple(self.kept.shape)} must be "
                f"[{num_layers}, {num_slots}] / [{num_layers}] like physical_to_logical"
            )
        if int(self.changed.sum()) != self.num_copies:
            raise PlacementError(f"Plan: num_copies={self.num_copies} but {int(self.changed.sum())} slots changed")
        if not torch.equal(self.replica_count.sum(-1), torch.full((num_layers,), num_slots)):
            raise PlacementError(f"Plan: replica_count must sum to {num_slots} slots in every layer")

    @property
    def copies_per_layer(self) -> torch.Tensor:
        """[L] int64: slots that change in every layer."""
        return self.changed.sum(-1)

    @property
    def moves(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per layer, the ``(slot, new logical expert)`` pairs of the slots that change, by slot."""
        out = []
        for layer in range(self.physical_to_logical.shape[0]):
            slots = torch.nonzero(self.changed[layer]).squeeze(1)
            out.append(tuple(zip(slots.tolist(), self.physical_to_logical[layer, slots].tolist())))
        return tuple(out)


def plan_placement(
    load_LE: torch.Tensor,
    current: torch.Tensor | None,
    *,
    num_slots: int,
    num_nodes: int,
    num_ranks: int,
    num_groups: int,
    max_moves: int | None = None,
    min_gain: float = 0.0,
    copy_cost: float = 0.1,
    home_of: torch.Tensor | bool | None = None,
    remote_cost: float = 0.0,
) -> Plan:
    """Plan a placement for ``load_LE`` that reuses the deployed one where moving is not worth it.

    Per layer three candidates are scored on ``load_LE``: the deployed placement (no copies); a *sticky*
    plan (local search from the deployed placement: swaps and replica re-assignments on the most loaded
    GPU, each taken only if its balancedness gain exceeds ``copy_cost / S`` per newly changed slot, inside
    the budget; in the hierarchical policy experts stay on nodes that already host them); and a *fresh*
    plan (as :func:`rebalance_experts`) whose nodes, GPUs and slots are relabelled to overlap the deployed
    one most. The candidate with the best ``balancedness - copy_cost * changed_slots / S`` within the
    budget wins; then, if it gains less than ``min_gain`` balancedness over the deployed placement, the
    layer is kept as deployed.

    Args:
        load_LE: [L, E] load of every logical expert (>= 0).
        current: [L, S] int deployed physical->logical map (every expert at least once per layer), or
            None when nothing is deployed yet (the fresh plan; every slot counts as a copy).
        num_slots: physical slots S per layer (multiple of ``num_ranks``, >= E).
        num_nodes: nodes; the hierarchical policy is used when ``num_groups % num_nodes == 0``.
        num_ranks: expert-parallel ranks (GPUs) G.
        num_groups: expert groups.
        max_moves: budget of changed slots *per layer* (None: unlimited; 0 keeps every layer).
        min_gain: skip rule, the least balancedness gain (e.g. 0.005) for which a layer is changed.
        copy_cost: balancedness that changing every slot of a layer must buy, i.e. ``copy_cost / S`` per
            changed slot (0 takes every improving move; the default 0.1 asks 0.00035 per slot at S=288).
        home_of: [E] int home rank of every logical expert, or True for the block layout of
            :mod:`dualmoe.moe.placement` (expert e on rank ``e // (E / num_ranks)``), or None (no homes).
        remote_cost: balancedness that holding *every* slot of a layer off its home must buy, i.e.
            ``remote_cost / S`` per remote slot (0: homes ignored, the plan is as without ``home_of``).

    Returns:
        The :class:`Plan`.

    Raises:
        PlacementError: bad shapes/values (the message names the argument, value and rule).
    """
    load_LE = _check_load(load_LE, "load_LE")
    num_layers, num_experts = load_LE.shape
    _check_shape(num_experts, num_slots, num_groups, num_nodes, num_ranks, slots_name="num_slots")
    if max_moves is not None and (isinstance(max_moves, bool) or not isinstance(max_moves, int) or max_moves < 0):
        raise PlacementError(f"max_moves={max_moves!r}: must be None or an int >= 0 (changed slots per layer)")
    for name, value in (("min_gain", min_gain), ("copy_cost", copy_cost)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise PlacementError(f"{name}={value!r}: must be a number >= 0")
    if not isinstance(remote_cost, (int, float)) or isinstance(remote_cost, bool) or not remote_cost >= 0:
        raise PlacementError(f"remote_cost={remote_cost!r}: must be a number >= 0")
    home_E = _check_home(home_of, num_experts, num_ranks)
    current_LS = None if current is None else _check_current(current, num_layers, num_slots, num_experts)
    with torch.inference_mode():  # ~10 % less per-op overhead; the new map is cloned out of it below
        new_LS = _plan(load_LE, current_LS, num_slots=num_slots, num_groups=num_groups, num_nodes=num_nodes,
                       num_gpus=num_ranks, max_moves=max_moves, min_gain=float(min_gain), copy_cost=float(copy_cost),
                       home_E=home_E, remote_cost=float(remote_cost))
    new_LS = new_LS.clone()
    after_L = balancedness(new_LS, load_LE, num_ranks)
    if current_LS is None:
        return _make_plan(new_LS, torch.ones_like(new_LS, dtype=torch.bool), torch.zeros_like(after_L), after_L,
                          num_experts)
    before_L = balancedness(current_LS, load_LE, num_ranks)
    return _make_plan(new_LS, new_LS != current_LS, before_L, after_L, num_experts)


def _plan(load_LE: torch.Tensor, current_LS: torch.Tensor | None, *, num_slots: int, num_groups: int, num_nodes: int,
          num_gpus: int, max_moves: int | None, min_gain: float, copy_cost: float, home_E: torch.Tensor | None,
          remote_cost: float) -> torch.Tensor:
    """The new map [L, S] of :func:`plan_placement` (checked inputs)."""
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    shape = dict(num_slots=num_slots, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus)
    if current_LS is None:
        fresh_LS, _ = _plan_fresh(load_LE, **shape)
        if home_E is not None and remote_cost > 0:
            groups = num_nodes if hierarchical else 1
            homed_LS = relabel(fresh_LS, None, num_gpus=num_gpus, num_nodes=groups, home_E=home_E,
                               home_weight=remote_cost)
            better_L = num_remote(homed_LS, home_E, num_gpus) < num_remote(fresh_LS, home_E, num_gpus)
            fresh_LS = torch.where(better_L.unsqueeze(1), homed_LS, fresh_LS)  # the greedy relabel is a heuristic
            fresh_LS = home_swaps(fresh_LS, load_LE, home_E, num_gpus=num_gpus, num_nodes=groups,
                                  remote_cost=remote_cost)
        return fresh_LS
    return choose_per_layer(
        load_LE,
        current_LS,
        lambda layers: _plan_fresh(load_LE[layers], **shape)[0],  # made only for layers where it may win
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        hierarchical=hierarchical,
        max_moves=max_moves,
        min_gain=min_gain,
        copy_cost=copy_cost,
        home_E=home_E,
        remote_cost=remote_cost,
        bound_L=_balancedness_bound(load_LE, **shape),
    )


def home_ranks(num_experts: int, num_ranks: int) -> torch.Tensor:
    """[E] int64 home rank of every logical expert in the block layout: ``e // (E / num_ranks)``."""
    if num_ranks < 1 or num_experts % num_ranks:
        raise PlacementError(f"home_of=True: the number of logical experts ({num_experts}) must be divisible by "
                             f"num_ranks ({num_ranks}) for the block home layout; pass an explicit [E] tensor")
    return torch.arange(num_experts) // (num_experts // num_ranks)


def remote_slots(physical_to_logical: torch.Tensor, home_of: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L] int64 slots of a map [L, S] whose GPU is not their logical expert's home rank ``home_of`` [E]."""
    return num_remote(physical_to_logical, home_of.to(torch.int64), num_gpus)


def replica_count_of(physical_to_logical: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E] int64 replica counts of a physical->logical map [L, S]."""
    num_layers = physical_to_logical.shape[0]
    count_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    return count_LE.scatter_add_(1, physical_to_logical, torch.ones_like(physical_to_logical))


def logical_to_physical_map(physical_to_logical: torch.Tensor, count_LE: torch.Tensor) -> torch.Tensor:
    """[L, E, M] int64: the slots of every logical expert in ascending order, padded with -1."""
    num_layers, num_slots = physical_to_logical.shape
    num_experts = count_LE.shape[1]
    width = max(int(count_LE.max()), 1)
    order_LS = torch.sort(physical_to_logical, dim=-1, stable=True).indices  # by expert, then by slot
    expert_LS = physical_to_logical.gather(1, order_LS)
    first_LE = count_LE.cumsum(-1) - count_LE
    rank_LS = torch.arange(num_slots) - first_LE.gather(1, expert_LS)
    out = torch.full((num_layers, num_experts * width), -1, dtype=torch.int64)
    out.scatter_(1, expert_LS * width + rank_LS, order_LS)
    return out.view(num_layers, num_experts, width)


def gpu_load(physical_to_logical: torch.Tensor, load_LE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L, G] float64 load of every GPU; an expert's load is split evenly over its replicas."""
    load_LE = load_LE.to(torch.float64)
    count_LE = replica_count_of(physical_to_logical, load_LE.shape[1])
    share_LE = load_LE / count_LE.clamp(min=1)
    return share_LE.gather(1, physical_to_logical).view(physical_to_logical.shape[0], num_gpus, -1).sum(-1)


def balancedness(physical_to_logical: torch.Tensor, load_LE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L] float64 mean GPU load / max GPU load per layer (1.0 for a layer without load).

    Over several layers use ``sum(mean) / sum(max)``, e.g. ``gpu_load(...).mean(-1).sum() / ...max(-1)...``.
    """
    load_LG = gpu_load(physical_to_logical, load_LE, num_gpus)
    top_L = load_LG.max(-1).values
    return torch.where(top_L > 0, load_LG.mean(-1) / top_L.clamp(min=1e-300), torch.ones_like(top_L))


# --------------------------------------------------------------------------------------------------
# fresh plans


def _plan_fresh(
    load_LE: torch.Tensor, *, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan from scratch; returns (physical_to_logical [L, S], replica_count [L, E])."""
    if num_groups % num_nodes != 0:
        num_groups = num_nodes = 1  # global policy: one group, one node (as the reference)
    num_layers, num_experts = load_LE.shape
    experts_per_group = num_experts // num_groups
    group_load_LG = load_LE.view(num_layers, num_groups, experts_per_group).sum(-1)
    node_of_group_KG, layer_K = _candidate_splits(group_load_LG, load_LE, num_slots=num_slots,
                                                  num_nodes=num_nodes, num_gpus=num_gpus)
    num_cands = layer_K.shape[0]
    groups_per_node = num_groups // num_nodes
    # Experts of every (candidate, node): its groups in ascending order, their experts in order.
    group_KNg = torch.sort(node_of_group_KG, dim=-1, stable=True).indices.view(num_cands, num_nodes, groups_per_node)
    local_to_logical = (group_KNg.unsqueeze(-1) * experts_per_group + torch.arange(experts_per_group)).flatten(-2)
    local_to_logical_RE = local_to_logical.reshape(num_cands * num_nodes, -1)
    row_load_RE = load_LE[layer_K.repeat_interleave(num_nodes).unsqueeze(1), local_to_logical_RE]
    slot_expert_RS, count_RE = _plan_domain(row_load_RE, num_slots=num_slots // num_nodes,
                                            num_packs=num_gpus // num_nodes)
    # Per layer the candidate split with the lowest max GPU load: the greedy one (candidate l of layer l)
    # unless the extra candidate of that layer is strictly better.
    share_RE = row_load_RE / count_RE
    top_K = share_RE.gather(1, slot_expert_RS).view(num_cands, num_gpus, -1).sum(-1).max(-1).values
    best_L = torch.arange(num_layers)
    extra_K = torch.arange(num_layers, num_cands)
    better = top_K[extra_K] < top_K[layer_K[extra_K]]
    best_L[layer_K[extra_K[better]]] = extra_K[better]
    pick = (best_L.unsqueeze(1) * num_nodes + torch.arange(num_nodes)).flatten()
    logical_LS = local_to_logical_RE[pick].gather(1, slot_expert_RS[pick]).view(num_layers, num_slots)
    count_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    count_LE.scatter_(1, local_to_logical_RE[pick].view(num_layers, -1), count_RE[pick].view(num_layers, -1))
    return logical_LS, count_LE


def _candidate_splits(
    group_load_LG: torch.Tensor, load_LE: torch.Tensor, *, num_slots: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate group->node splits: (node of every group [K, groups], layer of every candidate [K]).

    Candidate l (< L) is the greedy LPT split of layer l; after them come, for the layers where it is a
    different partition, the split with the lowest lower bound max(node load / GPUs per node, best
    per-replica load of the node) among all splits (when they can be enumerated).
    """
    num_layers, num_groups = group_load_LG.shape
    layers_L = torch.arange(num_layers)
    if num_nodes == 1:
        return torch.zeros(num_layers, num_groups, dtype=torch.int64), layers_L
    greedy_LG = pack_greedy(group_load_LG, torch.arange(num_groups).expand(num_layers, -1),
                            num_packs=num_nodes, num_experts=num_groups)
    tables = _split_tables(num_groups, num_nodes, load_LE.shape[1] // num_groups)
    if tables is None:
        return greedy_LG, layers_L
    bound_LK = _split_bounds(load_LE, tables, num_slots=num_slots, num_nodes=num_nodes, num_gpus=num_gpus)
    bounded_LG = tables[0][bound_LK.argmin(-1)]
    # Compare as partitions: label the greedy blocks in order of their smallest group, as the enumeration does.
    first_LN = torch.full((num_layers, num_nodes), num_groups, dtype=torch.int64)
    first_LN.scatter_reduce_(1, greedy_LG, torch.arange(num_groups).expand(num_layers, -1), reduce="amin")
    canonical_LG = first_LN.argsort(-1).argsort(-1).gather(1, greedy_LG)
    differ_L = (canonical_LG != bounded_LG).any(-1)
    return torch.cat([greedy_LG, bounded_LG[differ_L]]), torch.cat([layers_L, layers_L[differ_L]])


@functools.lru_cache(maxsize=8)
def _split_tables(num_groups: int, num_nodes: int,
                  experts_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(all group->node splits [K, groups], experts of every node-sized group subset [U, experts per node],
    subset of every node of every split [K, N]), or None when the splits are too many to enumerate."""
    splits_KG = group_partitions(num_groups, num_nodes)
    if splits_KG is None:
        return None
    subsets = list(itertools.combinations(range(num_groups), num_groups // num_nodes))
    subset_index = {s: i for i, s in enumerate(subsets)}
    subset_experts = torch.tensor(
        [[g * experts_per_group + e for g in s for e in range(experts_per_group)] for s in subsets]
    )
    split_subsets = torch.tensor(
        [[subset_index[tuple(g for g, node in enumerate(row) if node == n)] for n in range(num_nodes)]
         for row in splits_KG.tolist()]
    )
    return splits_KG, subset_experts, split_subsets


def _split_bounds(load_LE: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, num_slots: int,
                  num_nodes: int, num_gpus: int) -> torch.Tensor:
    """[L, K] lower bound on the max GPU load of every split: max over its nodes of max(node load / GPUs
    per node, the least max per-replica load of the node's experts on the node's slots)."""
    _, subset_experts, split_subsets = tables
    num_layers, num_sub = load_LE.shape[0], subset_experts.shape[0]
    gpus_per_node = num_gpus // num_nodes
    sub_load = load_LE[:, subset_experts].reshape(num_layers * num_sub, -1)  # [L * subsets, experts per node]
    count = apportion(sub_load, num_slots // num_nodes, gpus_per_node)
    per_replica = (sub_load / count).max(-1).values.view(num_layers, num_sub)
    bound_LU = torch.maximum(sub_load.sum(-1).view(num_layers, num_sub) / gpus_per_node, per_replica)
    return bound_LU[:, split_subsets].max(-1).values


def _balancedness_bound(load_LE: torch.Tensor, *, num_slots: int, num_groups: int, num_nodes: int,
                       num_gpus: int) -> torch.Tensor:
    """[L] float64 upper bound on the balancedness of any placement of the policy (mean GPU load over a
    lower bound on the max: the mean, the least max per-replica load, and in the hierarchical policy the
    best group->node split's node loads when the splits can be enumerated)."""
    load_LE = load_LE.to(torch.float64)
    mean_L = load_LE.sum(-1) / num_gpus
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    tables = _split_tables(num_groups, num_nodes, load_LE.shape[1] // num_groups) if hierarchical else None
    if tables is not None:
        low_L = _split_bounds(load_LE, tables, num_slots=num_slots, num_nodes=num_nodes, num_gpus=num_gpus).min(-1)
        low_L = torch.maximum(low_L.values, mean_L)
    else:  # an expert lives on one node: at most GPUs-per-node replicas in the hierarchical policy
        count = apportion(load_LE, num_slots, num_gpus // num_nodes if hierarchical else num_gpus)
        low_L = torch.maximum(mean_L, (load_LE / count).max(-1).values)
    return torch.where(low_L > 0, mean_L / low_L.clamp(min=1e-300), torch.ones_like(mean_L))


def _plan_domain(load_RE: torch.Tensor, *, num_slots: int, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts, greedy packing and local search for independent domains; returns (slot_expert_RS, count_RE)
    with the slots of pack p at ``p * (S / P) ...``, experts ascending inside a pack."""
    num_rows, num_experts = load_RE.shape
    exact = place_exactly(load_RE, num_slots=num_slots, num_packs=num_packs)
    if exact is not None:  # tiny domains (tests, toy models): optimal by enumeration
        return exact
    count_RE = apportion(load_RE, num_slots, num_packs)
    cum_RE = count_RE.cumsum(-1)
    item_expert_RX = torch.searchsorted(cum_RE, torch.arange(num_slots).expand(num_rows, -1).contiguous(), right=True)
    item_weight_RX = (load_RE / count_RE).gather(1, item_expert_RX)
    pack_RX = pack_greedy(item_weight_RX, item_expert_RX, num_packs=num_packs, num_experts=num_experts)
    slot_expert_RS = torch.sort(pack_RX * num_experts + item_expert_RX, dim=-1).values % num_experts
    slot_expert_RS, count_RE = local_search(slot_expert_RS, count_RE, load_RE, num_packs=num_packs, cap=num_packs)
    slot_expert_RS = slot_expert_RS.view(num_rows, num_packs, -1).sort(-1).values.view(num_rows, num_slots)
    return slot_expert_RS, count_RE


# --------------------------------------------------------------------------------------------------
# checks and plan assembly


def _make_plan(new_LS: torch.Tensor, changed_LS: torch.Tensor, before_L: torch.Tensor, after_L: torch.Tensor,
               num_experts: int) -> Plan:
    count_LE = replica_count_of(new_LS, num_experts)
    return Plan(
        physical_to_logical=new_LS,
        logical_to_physical=logical_to_physical_map(new_LS, count_LE),
        replica_count=count_LE,
        changed=changed_LS,
        kept=~changed_LS.any(-1),
        balancedness_before=before_L,
        balancedness_after=after_L,
        num_copies=int(changed_LS.sum()),
    )


def _check_load(load: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(load, torch.Tensor) or load.dim() != 2 or load.shape[0] < 1 or load.shape[1] < 1:
        shape = tuple(load.shape) if isinstance(load, torch.Tensor) else type(load).__name__
        raise PlacementError(f"{name}: expected a 2-D [layers, experts] tensor, got {shape}")
    if load.is_complex() or load.dtype == torch.bool:
        raise PlacementError(f"{name}: expected a real tensor, got dtype {load.dtype}")
    load = load.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        low, high = float(load.min()), float(load.max())
        raise PlacementError(f"{name}: loads must be finite and >= 0 (min {low}, max {high})")
    return load.contiguous()


def _check_shape(num_experts: int, num_slots: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                 slots_name: str) -> None:
    gpus_name = "num_gpus" if slots_name == "num_replicas" else "num_ranks"
    for name, value in ((slots_name, num_slots), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        (gpus_name, num_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlacementError(f"{name}={value!r}: must be an int >= 1")
    if num_slots % num_gpus:
        raise PlacementError(f"{slots_name}={num_slots}: must be a multiple of {gpus_name} ({num_gpus}) so every "
                             f"GPU holds the same number of slots")
    if num_slots < num_experts:
        raise PlacementError(f"{slots_name}={num_slots}: must be >= the number of logical experts ({num_experts}) "
                             f"so every expert has a slot")
    if num_groups % num_nodes == 0:  # hierarchical policy
        if num_experts % num_groups:
            raise PlacementError(f"num_groups={num_groups}: the number of logical experts ({num_experts}) must be "
                                 f"divisible by it (hierarchical policy, num_groups % num_nodes == 0)")
        if num_gpus % num_nodes:
            raise PlacementError(f"{gpus_name}={num_gpus}: must be a multiple of num_nodes ({num_nodes}) "
                                 f"(hierarchical policy, num_groups % num_nodes == 0)")


def _int_map(name: str, value: object, shape: tuple[int, ...], upper: int, *, what: str, items: str) -> torch.Tensor:
    """`value` as a CPU int64 tensor of `shape` with entries in [0, upper), else PlacementError naming `name`."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PlacementError(f"{name}: expected {what}, got {got}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise PlacementError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
    out = value.detach().to(device="cpu", dtype=torch.int64).contiguous()
    if bool((out < 0).any()) or bool((out >= upper).any()):
        raise PlacementError(f"{name}: {items} must lie in [0, {upper}), got [{int(out.min())}, {int(out.max())}]")
    return out


def _check_home(home_of: torch.Tensor | bool | None, num_experts: int, num_ranks: int) -> torch.Tensor | None:
    if home_of is None or home_of is False:
        return None
    if home_of is True:
        return home_ranks(num_experts, num_ranks)
    return _int_map("home_of", home_of, (num_experts,), num_ranks,
                    what=f"a [{num_experts}] tensor of home ranks (or True)", items="home ranks")


def _check_current(current: torch.Tensor, num_layers: int, num_slots: int, num_experts: int) -> torch.Tensor:
    current = getattr(current, "physical_to_logical", current)  # also accept a placement object
    current = _int_map("current", current, (num_layers, num_slots), num_experts,
                       what=f"a [{num_layers}, {num_slots}] physical->logical map", items="logical expert ids")
    missing = replica_count_of(current, num_experts) == 0
    if bool(missing.any()):
        layer, expert = (int(v) for v in torch.nonzero(missing)[0])
        raise PlacementError(f"current: layer {layer} has no slot for logical expert {expert}; every expert needs "
                             f">= 1 replica")
    return current
