"""Vectorized building blocks of the EPLB planner: replica counts, greedy packing, exact tiny cases.

Every function works on a batch of independent *rows* (one row = one layer, or one layer x node x
candidate in the hierarchical policy) and loops in Python only over the items of one row, never over
rows, so 58 layers cost about as much as one. Tie-breaking is fixed (stable sorts, first index on equal
keys), so equal inputs give equal plans on every rank.

Model: a row has ``E`` logical experts with load ``w`` (tokens), ``P`` packs (GPUs) of ``Sp`` slots each
(``S = P * Sp`` slots). An expert with ``c`` replicas puts ``w / c`` on every GPU holding a replica.

Legend (shape suffixes): R rows, E experts of a row, P packs (GPUs) of a row, S slots of a row,
X items to pack, K candidates, D domains (nodes) of a row.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

__all__ = ["apportion", "group_partitions", "pack_greedy", "place_exactly"]

_INF = float("inf")


def apportion(load_RE: torch.Tensor, num_slots: int, cap: int) -> torch.Tensor:
    """Replica counts [R, E] (int64) with sum ``num_slots`` per row that minimise the max per-replica load.

    Greedy apportionment (one replica at a time to the expert with the largest ``w / c``; exact for this
    objective). No expert gets more than ``cap`` replicas (the GPUs it may live on, so no two replicas
    share a GPU) unless ``num_slots > E * cap`` forces it; then the cap becomes ``ceil(num_slots / E)``.
    """
    num_rows, num_experts = load_RE.shape
    cap = max(cap, -(-num_slots // num_experts))
    count_RE = torch.ones(num_rows, num_experts, dtype=torch.int64)
    rows_R = torch.arange(num_rows)
    ratio_RE = load_RE.clone()  # w / c, or -1 once the expert is at its cap
    if cap == 1:
        ratio_RE.fill_(-1.0)
    for _ in range(num_slots - num_experts):
        expert_R = ratio_RE.argmax(-1)
        count_R = count_RE[rows_R, expert_R] + 1
        count_RE[rows_R, expert_R] = count_R
        ratio_RE[rows_R, expert_R] = torch.where(count_R >= cap, -1.0, load_RE[rows_R, expert_R] / count_R)
    return count_RE


def pack_greedy(weight_RX: torch.Tensor, expert_RX: torch.Tensor, *, num_packs: int, num_experts: int) -> torch.Tensor:
    """Pack items into ``num_packs`` packs of equal size (LPT); returns the pack of every item [R, X].

    Items go in descending weight order (stable) to the lightest pack that is not full and does not hold
    the item's expert yet (a pack holding it is used only when no other pack has room). Equal loads go to
    the pack with fewer items, then the lower index, so the first ``num_packs`` items fill one pack each.
    """
    num_rows, num_items = weight_RX.shape
    per_pack = num_items // num_packs
    order_RX = torch.sort(weight_RX, dim=-1, descending=True, stable=True).indices
    weight_XR = weight_RX.gather(1, order_RX).t().contiguous()
    expert_XR = expert_RX.gather(1, order_RX).t().contiguous()
    rows_R = torch.arange(num_rows)
    pack_XR = torch.empty(num_items, num_rows, dtype=torch.int64)
    pack_XR[:num_packs] = torch.arange(num_packs).unsqueeze(1)
    load_RP = weight_XR[:num_packs].t().to(torch.float64).contiguous()
    count_RP = torch.ones(num_rows, num_packs, dtype=torch.int64)
    # `big` exceeds any pack load, so a pack that already hosts the expert loses to every other open pack.
    big_R = weight_RX.sum(-1).to(torch.float64) + 1.0
    penalty_REP = torch.zeros(num_rows, num_experts, num_packs, dtype=torch.float64)
    penalty_REP[rows_R.unsqueeze(1), expert_XR[:num_packs].t(), torch.arange(num_packs)] = big_R.unsqueeze(1)
    if per_pack == 1:
        load_RP.fill_(_INF)
    for item in range(num_packs, num_items):
        expert_R = expert_XR[item]
        pack_R = (load_RP + penalty_REP[rows_R, expert_R]).argmin(-1)
        pack_XR[item] = pack_R
        load_RP.index_put_((rows_R, pack_R), weight_XR[item].to(torch.float64), accumulate=True)
        count_RP.index_put_((rows_R, pack_R), torch.ones(num_rows, dtype=torch.int64), accumulate=True)
        load_RP.masked_fill_(count_RP == per_pack, _INF)
        penalty_REP[rows_R, expert_R, pack_R] = big_R
    pack_RX = torch.empty(num_rows, num_items, dtype=torch.int64)
    pack_RX.scatter_(1, order_RX, pack_XR.t())
    return pack_RX


def place_exactly(
    load_RE: torch.Tensor, *, num_slots: int, num_packs: int, limit: int = 20000
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Optimal placement of tiny rows by enumeration: (slot_expert_RS, count_RE), or None when there are
    more than ``limit`` candidate placements (or a pack needs more slots than there are experts).

    Candidates are all multisets of ``num_packs`` expert subsets of size ``S / P`` (packs are
    interchangeable; no expert twice on a pack) that give every expert a replica; the first candidate
    with the lowest max pack load wins. Slots of a pack hold its experts in ascending order.
    """
    num_rows, num_experts = load_RE.shape
    table = _placements(num_experts, num_packs, num_slots // num_packs, limit)
    if table is None:
        return None
    subsets_KPp, share_KPE = table
    pack_load_RKP = torch.einsum("re,kpe->rkp", load_RE.to(torch.float64), share_KPE)
    best_R = pack_load_RKP.amax(-1).argmin(-1)
    slot_expert_RS = subsets_KPp[best_R].reshape(num_rows, num_slots)
    count_RE = torch.zeros(num_rows, num_experts, dtype=torch.int64)
    count_RE.scatter_add_(1, slot_expert_RS, torch.ones_like(slot_expert_RS))
    return slot_expert_RS, count_RE


@functools.lru_cache(maxsize=16)
def _placements(
    num_experts: int, num_packs: int, per_pack: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All covering placements: subsets [K, P, per_pack] and the share of every expert's load that lands
    on every pack, [K, P, E] (1 / replica count where the pack hosts the expert)."""
    if per_pack > num_experts:
        return None
    num_subsets = math.comb(num_experts, per_pack)
    if math.comb(num_subsets + num_packs - 1, num_packs) > limit:
        return None
    subsets = torch.tensor(list(itertools.combinations(range(num_experts), per_pack)), dtype=torch.int64)
    choice_KP = torch.tensor(list(itertools.combinations_with_replacement(range(num_subsets), num_packs)),
                             dtype=torch.int64)
    member_KPE = torch.zeros(choice_KP.shape[0], num_packs, num_experts, dtype=torch.float64)
    member_KPE.scatter_(2, subsets[choice_KP], 1.0)
    count_KE = member_KPE.sum(1)
    keep = (count_KE > 0).all(-1)
    share_KPE = (member_KPE / count_KE.clamp(min=1).unsqueeze(1))[keep]
    return subsets[choice_KP[keep]], share_KPE


def group_partitions(num_groups: int, num_nodes: int, limit: int = 4096) -> torch.Tensor | None:
    """All ways [K, num_groups] to split groups into ``num_nodes`` unlabelled equal blocks (node label of
    each group, blocks labelled in order of their smallest group), or None when there are over ``limit``."""
    size = num_groups // num_nodes
    count = math.factorial(num_groups) // (math.factorial(size) ** num_nodes * math.factorial(num_nodes))
    if count > limit:
        return None
    out: list[list[int]] = []

    def extend(labels: list[int], left: list[int], node: int) -> None:
        if not left:
            out.append(labels.copy())
            return
        head, rest = left[0], left[1:]
        for others in itertools.combinations(rest, size - 1):
            for g in (head, *others):
                labels[g] = node
            extend(labels, [g for g in rest if g not in others], node + 1)

    extend([0] * num_groups, list(range(num_groups)), 0)
    return torch.tensor(out, dtype=torch.int64)
