"""Migration-aware side of the EPLB planner: relabel a fresh plan onto the deployed one, plan sticky
moves from the deployed one, and pick per layer what is worth its copies.

A *copy* is a slot whose logical expert changes: its weights (and, in training, whatever state moves
with them) must be fetched. GPUs are interchangeable inside a node and nodes are interchangeable, so a
fresh plan can be relabelled (nodes permuted, GPUs permuted inside a node, slots permuted inside a GPU)
without changing any GPU's load; relabelling only changes how many slots need a copy.

Legend (shape suffixes): L layers, E logical experts, S slots, G GPUs, N nodes, R rows, A items to
assign (nodes or GPUs), T slots of one GPU, K permutations.
"""

from __future__ import annotations

import itertools

import torch
from dualmoe.moe.eplb_search import local_search

__all__ = ["choose_per_layer", "relabel"]

_EXACT_ASSIGN_MAX = 6  # enumerate all permutations up to this many nodes/GPUs (720)
_EXCHANGE_ROUNDS = 8  # rounds of pairwise exchanges after the greedy assignment (one exchange per row each)
_EXCHANGE_MAX = 64  # ... only for up to this many GPUs per node


def choose_per_layer(
    load_LE: torch.Tensor,
    current_LS: torch.Tensor,
    fresh_LS: torch.Tensor,
    *,
    num_gpus: int,
    num_nodes: int,
    hierarchical: bool,
    max_moves: int | None,
    min_gain: float,
    copy_cost: float,
) -> torch.Tensor:
    """Per layer the best of (deployed, sticky, relabelled fresh) by
    ``balancedness - copy_cost * changed_slots / S`` within ``max_moves`` changed slots; layers gaining
    less than ``min_gain`` stay as deployed. Returns the new map [L, S]."""
    num_layers, num_slots = current_LS.shape
    num_experts = load_LE.shape[1]
    groups = num_nodes if hierarchical else 1
    count_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    count_LE.scatter_add_(1, current_LS, torch.ones_like(current_LS))
    budget_L = None if max_moves is None else torch.full((num_layers,), max_moves, dtype=torch.int64)
    domain_G = torch.arange(num_gpus) // (num_gpus // groups) if hierarchical else None
    sticky_LS, _ = local_search(
        current_LS,
        count_LE,
        load_LE,
        num_packs=num_gpus,
        cap=num_gpus // groups,
        current_RS=current_LS,
        copy_penalty=copy_cost / num_slots,
        budget_R=budget_L,
        domain_P=domain_G,
        max_iters=num_slots if max_moves is None else max_moves,
    )
    cands_CLS = torch.stack([current_LS, sticky_LS, fresh_LS])
    bal_CL = torch.stack([_balancedness(c, load_LE, num_gpus) for c in cands_CLS])
    copies_CL = (cands_CLS[:2] != current_LS).sum(-1)
    score_CL = bal_CL[:2] - copy_cost * copies_CL / num_slots
    # The fresh plan is relabelled only where it could win even with no copy at all.
    maybe_L = (bal_CL[2] > score_CL.max(0).values) & (bal_CL[2] - bal_CL[0] >= min_gain)
    fresh_score_L = torch.full((num_layers,), -float("inf"), dtype=torch.float64)
    if bool(maybe_L.any()):
        layers = torch.nonzero(maybe_L).squeeze(1)
        cands_CLS[2, layers] = relabel(fresh_LS[layers], current_LS[layers], num_gpus=num_gpus, num_nodes=groups)
        copies_L = (cands_CLS[2, layers] != current_LS[layers]).sum(-1)
        fresh_score_L[layers] = bal_CL[2, layers] - copy_cost * copies_L / num_slots
        if max_moves is not None:
            fresh_score_L[layers] = torch.where(copies_L <= max_moves, fresh_score_L[layers], -float("inf"))
    if max_moves is not None:
        score_CL[1] = torch.where(copies_CL[1] <= max_moves, score_CL[1], -float("inf"))
    score_CL = torch.cat([score_CL, fresh_score_L.unsqueeze(0)])
    best_L = score_CL.argmax(0)  # first on ties: deployed, then sticky, then fresh
    best_L = torch.where(bal_CL[best_L, torch.arange(num_layers)] - bal_CL[0] < min_gain, 0, best_L)
    return cands_CLS[best_L, torch.arange(num_layers)]


def relabel(new_LS: torch.Tensor, current_LS: torch.Tensor, *, num_gpus: int, num_nodes: int) -> torch.Tensor:
    """Permute nodes, GPUs inside nodes and slots inside GPUs of ``new_LS`` so that as many slots as
    possible keep their deployed expert; every GPU keeps its multiset of experts. [L, S]"""
    num_layers, num_slots = new_LS.shape
    num_experts = int(torch.maximum(new_LS.max(), current_LS.max())) + 1
    per_gpu = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    new_LGT = new_LS.view(num_layers, num_gpus, per_gpu)
    old_LGT = current_LS.view(num_layers, num_gpus, per_gpu)
    if num_nodes > 1:
        new_node = _presence(new_LGT, num_experts).view(num_layers, num_nodes, gpus_per_node, -1).sum(2)
        old_node = _presence(old_LGT, num_experts).view(num_layers, num_nodes, gpus_per_node, -1).sum(2)
        overlap = torch.minimum(new_node.unsqueeze(2), old_node.unsqueeze(1)).sum(-1)
        node_perm_LN = _assign(overlap)
        new_LGT = _permute_blocks(new_LGT.view(num_layers, num_nodes, gpus_per_node, per_gpu), node_perm_LN)
        new_LGT = new_LGT.view(num_layers, num_gpus, per_gpu)
    # GPU overlap [rows, new GPU, old GPU]: for every new slot, which old GPUs of the node hold its expert
    # (a gather of T rows per new GPU instead of a product over all E experts).
    rows = num_layers * num_nodes
    old_holds = torch.zeros(rows, num_experts * gpus_per_node, dtype=torch.bool)
    old_RGT = old_LGT.reshape(rows, gpus_per_node, per_gpu)
    old_holds.scatter_(1, (old_RGT * gpus_per_node + torch.arange(gpus_per_node).view(1, -1, 1)).view(rows, -1), True)
    new_RGT = new_LGT.reshape(rows, gpus_per_node, per_gpu)
    holds_REG = old_holds.view(rows, num_experts, gpus_per_node)
    overlap_RGG = holds_REG[torch.arange(rows).view(-1, 1, 1), new_RGT].sum(2, dtype=torch.float32)
    gpu_perm = _assign(overlap_RGG)
    new_RAT = _permute_blocks(new_LGT.view(rows, gpus_per_node, per_gpu), gpu_perm)
    aligned = _align_slots(new_RAT.reshape(-1, per_gpu), old_LGT.reshape(-1, per_gpu))
    return aligned.view(num_layers, num_slots)


def _balancedness(placement_LS: torch.Tensor, load_LE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    count = torch.zeros_like(load_LE).scatter_add_(1, placement_LS, torch.ones_like(placement_LS, dtype=load_LE.dtype))
    gpu_LG = (load_LE / count.clamp(min=1)).gather(1, placement_LS).view(placement_LS.shape[0], num_gpus, -1).sum(-1)
    top = gpu_LG.max(-1).values
    return torch.where(top > 0, gpu_LG.mean(-1) / top.clamp(min=1e-300), torch.ones_like(top))


def _presence(experts_LGT: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, G, E] float64 replica counts of every expert on every GPU."""
    num_layers, num_gpus, per_gpu = experts_LGT.shape
    flat = experts_LGT.reshape(num_layers * num_gpus, per_gpu)
    out = torch.zeros(flat.shape[0], num_experts, dtype=torch.float64)
    out.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    return out.view(num_layers, num_gpus, num_experts)


def _permute_blocks(blocks_RA: torch.Tensor, perm_RA: torch.Tensor) -> torch.Tensor:
    """Move block a of every row to position perm[a] (blocks along dim 1)."""
    out = torch.empty_like(blocks_RA)
    rows = torch.arange(blocks_RA.shape[0]).unsqueeze(1)
    out[rows, perm_RA] = blocks_RA
    return out


def _assign(overlap_RAA: torch.Tensor) -> torch.Tensor:
    """A permutation per row (new a -> old perm[a]) maximising the summed overlap: exact for up to
    ``_EXACT_ASSIGN_MAX`` items, else greedy rounds of proposals followed by pairwise exchanges."""
    num_rows, size, _ = overlap_RAA.shape
    torch.arange(num_rows)
    if size <= _EXACT_ASSIGN_MAX:
        perms_KA = torch.tensor(list(itertools.permutations(range(size))), dtype=torch.int64)
        flat_index = (torch.arange(size) * size + perms_KA).view(-1)
        score = overlap_RAA.reshape(num_rows, -1)[:, flat_index].view(num_rows, -1, size).sum(-1)
        return perms_KA[score.argmax(-1)]  # the identity (first) wins ties
    perm_RA = _propose_and_accept(overlap_RAA)
    # Pairwise exchanges while they raise the overlap ([R, A, A] work per round: skipped for many GPUs).
    for _ in range(_EXCHANGE_ROUNDS if size <= _EXCHANGE_MAX else 0):
        picked = overlap_RAA.gather(2, perm_RA.unsqueeze(1).expand(-1, size, -1))  # [r, a, b] = M[a, perm[b]]
        own = picked.diagonal(dim1=1, dim2=2)
        gain = picked + picked.transpose(1, 2) - own.unsqueeze(2) - own.unsqueeze(1)
        best, flat = gain.view(num_rows, -1).max(-1)
        take = torch.nonzero(best > 1e-9).squeeze(1)
        if take.numel() == 0:
            break
        first, second = flat[take] // size, flat[take] % size
        p_first, p_second = perm_RA[take, first], perm_RA[take, second]
        perm_RA[take, first] = p_second
        perm_RA[take, second] = p_first
    return perm_RA


def _propose_and_accept(overlap_RAA: torch.Tensor) -> torch.Tensor:
    """Greedy matching in rounds: every unmatched new item proposes to its best unmatched old item; each
    old item accepts its best proposal (lowest new index on ties). Items left without overlap are matched
    in index order. Returns perm [R, A] (new a -> old perm[a])."""
    num_rows, size, _ = overlap_RAA.shape
    perm_RA = torch.full((num_rows, size), -1, dtype=torch.int64)
    taken_RA = torch.zeros(num_rows, size, dtype=torch.bool)  # old items already matched
    work = overlap_RAA.clone()
    new_A = torch.arange(size).expand(num_rows, -1)
    for _ in range(size):
        best_RA, choice_RA = work.max(-1)
        valid = (best_RA > 0) & (perm_RA < 0)
        if not bool(valid.any()):
            break
        offer = torch.where(valid, best_RA, -1.0)
        top_offer = torch.full((num_rows, size), -1.0, dtype=offer.dtype).scatter_reduce_(1, choice_RA, offer, "amax")
        winner = valid & (offer == top_offer.gather(1, choice_RA))
        first = torch.full((num_rows, size), size, dtype=torch.int64)
        first.scatter_reduce_(1, choice_RA, torch.where(winner, new_A, size), "amin")
        winner &= first.gather(1, choice_RA) == new_A
        perm_RA = torch.where(winner, choice_RA, perm_RA)
        rows, news = torch.nonzero(winner, as_tuple=True)
        taken_RA[rows, choice_RA[rows, news]] = True
        work.masked_fill_(winner.unsqueeze(2) | taken_RA.unsqueeze(1), -1.0)
    # Leftovers: the k-th unmatched new item gets the k-th unmatched old item.
    left_new = perm_RA < 0
    if bool(left_new.any()):
        free_old = torch.sort(taken_RA.to(torch.int8), dim=-1, stable=True).indices
        rank = (left_new.cumsum(-1) - 1).clamp(min=0)
        perm_RA = torch.where(left_new, free_old.gather(1, rank), perm_RA)
    return perm_RA


def _align_slots(new_RT: torch.Tensor, old_RT: torch.Tensor) -> torch.Tensor:
    """Reorder each row of ``new_RT`` so experts also in ``old_RT`` sit where they sat before."""
    num_rows, per_gpu = new_RT.shape
    rows_R = torch.arange(num_rows)
    equal_RTT = new_RT.unsqueeze(2) == old_RT.unsqueeze(1)
    used_RT = torch.zeros(num_rows, per_gpu, dtype=torch.bool)
    pos_RT = torch.full((num_rows, per_gpu), -1, dtype=torch.int64)
    for t in range(per_gpu):
        cand = equal_RTT[:, t] & ~used_RT
        has = cand.any(-1)
        where = cand.to(torch.int8).argmax(-1)
        pos_RT[:, t] = torch.where(has, where, -1)
        used_RT[rows_R[has], where[has]] = True
    unmatched = pos_RT < 0
    rank = (unmatched.cumsum(-1) - 1).clamp(min=0)
    free_RT = torch.sort(used_RT.to(torch.int8), dim=-1, stable=True).indices  # free positions first, ascending
    pos_RT = torch.where(unmatched, free_RT.gather(1, rank), pos_RT)
    out = torch.empty_like(new_RT)
    out.scatter_(1, pos_RT, new_RT)
    return out
