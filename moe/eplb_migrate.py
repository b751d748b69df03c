"""Migration-aware side of the EPLB planner: relabel a fresh plan onto the deployed one, plan sticky
moves from the deployed one, and pick per layer what is worth its copies.

A *copy* is a slot whose logical expert changes: its weights (and, in training, whatever state moves
with them) must be fetched. GPUs are interchangeable inside a node and nodes are interchangeable, so a
fresh plan can be relabelled (nodes permuted, GPUs permuted inside a node, slots permuted inside a GPU)
without changing any GPU's load; relabelling only changes how many slots need a copy.

Home awareness (training): every logical expert's trainable weights live on a fixed *home* rank; a
slot on any other rank is a *remote* copy refreshed from the home (and its gradient sent home) every
step. With ``home_E`` and ``remote_cost > 0`` every candidate also pays ``remote_cost / S`` per remote
slot: relabelling weighs slots brought home against copies saved, and
:func:`dualmoe.moe.eplb_home.home_swaps` exchanges remote replicas with slots on their home rank
wherever the full objective rises.

Legend (shape suffixes): L layers, E logical experts, S slots, G GPUs, N nodes, R rows, A items to
assign (nodes or GPUs), T slots of one GPU, K permutations, C candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from dualmoe.moe.eplb_home import home_swaps, num_remote
from dualmoe.moe.eplb_pack import apportion
from dualmoe.moe.eplb_sticky import sticky_search

__all__ = ["choose_per_layer", "relabel"]

_EXACT_ASSIGN_MAX = 6  # enumerate all permutations up to this many nodes/GPUs (720)
_EXCHANGE_ROUNDS = 8  # rounds of pairwise exchanges after the greedy assignment (one exchange per row each)
_EXCHANGE_MAX = 64  # ... only for up to this many GPUs per node
_FRESH_MIN_COPIES = 0.25  # share of the slots a relabelled fresh plan is assumed to copy at least


def choose_per_layer(
    load_LE: torch.Tensor,
    current_LS: torch.Tensor,
    fresh: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    *,
    num_gpus: int,
    num_nodes: int,
    hierarchical: bool,
    max_moves: int | None,
    min_gain: float,
    copy_cost: float,
    home_E: torch.Tensor | None = None,
    remote_cost: float = 0.0,
    bound_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per layer the best of (deployed, sticky, relabelled fresh) by
    ``balancedness - copy_cost * changed_slots / S - remote_cost * remote_slots / S`` within
    ``max_moves`` changed slots; layers gaining less than ``min_gain`` balancedness stay as deployed.

    ``fresh`` is the fresh plan [L, S], or a function giving it for the layers of an index tensor. Work
    is skipped where it cannot pay: with ``min_gain > 0``, layers where no placement can gain
    ``min_gain`` (balancedness bound: mean GPU load over the least possible max per-replica load) are
    kept without any search. With ``bound_L`` (an upper bound on the fresh plan's balancedness per
    layer) the fresh plan is made only for layers where it could win if relabelling left
    ``_FRESH_MIN_COPIES`` (25 %) of the slots to copy: relabelled fresh plans copy 50-80 % at
    DeepSeek-V3 shapes (32-144 GPUs), and one much closer to the deployed placement is a few moves from
    it, where the sticky search looks. At copy_cost 0.1 and 32 GPUs the sticky plan mostly ends within
    0.0015 of the bound, so the fresh plan (about half the planning time) is skipped in nearly every
    layer; at the Rebalancer's copy_cost 1e-4, or where the sticky plan stays far from the bound, it is
    made. On the benchmark grid and the test battery the skip changes no plan.

    With ``home_E`` and ``remote_cost > 0`` two home-aware candidates join: the sticky plan after
    :func:`home_swaps`, and the fresh plan relabelled for copies *and* homes, then home-swapped. A layer
    whose winner would hold more remote slots than the winner without remote cost keeps the latter, so
    the remote cost never adds remote slots. Returns the new map [L, S]."""
    num_layers, num_slots = current_LS.shape
    groups = num_nodes if hierarchical else 1
    budget_L = None if max_moves is None else torch.full((num_layers,), max_moves, dtype=torch.int64)
    domain_G = torch.arange(num_gpus) // (num_gpus // groups) if hierarchical else None
    searched_L = torch.ones(num_layers, dtype=torch.bool)
    if min_gain > 0:  # the skip rule rejects every plan of a layer whose bound gains less than min_gain
        load64_LE = load_LE.to(torch.float64)
        mean_L = load64_LE.sum(-1) / num_gpus
        share_L = (load64_LE / apportion(load64_LE, num_slots, num_slots)).max(-1).values
        bound_any_L = torch.where(mean_L > 0, mean_L / torch.maximum(mean_L, share_L).clamp(min=1e-300), 1.0)
        searched_L = bound_any_L - _balancedness(current_LS, load_LE, num_gpus) >= min_gain
    sticky_LS = current_LS.clone()
    if bool(searched_L.any()):
        rows = torch.nonzero(searched_L).squeeze(1)
        sticky_LS[rows] = sticky_search(current_LS[rows], load_LE[rows], num_packs=num_gpus, cap=num_gpus // groups,
                                        copy_penalty=copy_cost / num_slots,
                                        budget_R=None if budget_L is None else budget_L[rows], domain_P=domain_G,
                                        max_iters=num_slots if max_moves is None else max_moves)
    homes = home_E is not None and remote_cost > 0
    remote_CL = None  # the remote cost counts against the known candidates, not against the fresh one
    if homes:
        remote_CL = remote_cost * num_remote(torch.stack([current_LS, sticky_LS]), home_E, num_gpus) / num_slots
    fresh_LS, planned_L = _fresh_where_it_may_win(fresh, current_LS, sticky_LS, load_LE, bound_L, searched_L,
                                                  remote_CL, num_gpus=num_gpus, copy_cost=copy_cost)
    cands = [current_LS, sticky_LS, fresh_LS]
    if homes:
        cands.append(home_swaps(sticky_LS, load_LE, home_E, num_gpus=num_gpus, num_nodes=groups, current_LS=current_LS,
                                copy_cost=copy_cost, remote_cost=remote_cost, max_moves=max_moves))
        cands.append(fresh_LS.clone())
    cands_CLS = torch.stack(cands)
    bal_CL = torch.stack([_balancedness(c, load_LE, num_gpus) for c in cands_CLS])
    # The fresh plans are relabelled only where they could win even with no copy at all.
    plain_CL = bal_CL - copy_cost * (cands_CLS != current_LS).sum(-1) / num_slots
    maybe_L = (bal_CL[2] > plain_CL[:2].max(0).values) & (bal_CL[2] - bal_CL[0] >= min_gain) & planned_L
    fresh_C = [2, 4] if homes else [2]
    if bool(maybe_L.any()):
        layers = torch.nonzero(maybe_L).squeeze(1)
        cands_CLS[2, layers] = relabel(fresh_LS[layers], current_LS[layers], num_gpus=num_gpus, num_nodes=groups)
        if homes:
            aware = relabel(fresh_LS[layers], current_LS[layers], num_gpus=num_gpus, num_nodes=groups,
                            home_E=home_E, copy_weight=copy_cost, home_weight=remote_cost)
            cands_CLS[4, layers] = home_swaps(aware, load_LE[layers], home_E, num_gpus=num_gpus, num_nodes=groups,
                                              current_LS=current_LS[layers], copy_cost=copy_cost,
                                              remote_cost=remote_cost, max_moves=max_moves)
            bal_CL[4, layers] = _balancedness(cands_CLS[4, layers], load_LE[layers], num_gpus)
    copies_CL = (cands_CLS != current_LS).sum(-1)
    plain_CL = bal_CL - copy_cost * copies_CL / num_slots
    for c in fresh_C:
        plain_CL[c] = torch.where(maybe_L, plain_CL[c], -float("inf"))
    if max_moves is not None:
        plain_CL = torch.where(copies_CL <= max_moves, plain_CL, -float("inf"))
    layers_L = torch.arange(num_layers)
    best_L = plain_CL[:3].argmax(0)  # first on ties: deployed, then sticky, then fresh
    if homes:
        remote_CL = num_remote(cands_CLS, home_E, num_gpus)
        aware_L = (plain_CL - remote_cost * remote_CL / num_slots).argmax(0)
        fewer_L = remote_CL[aware_L, layers_L] <= remote_CL[best_L, layers_L]
        best_L = torch.where(fewer_L, aware_L, best_L)
    best_L = torch.where(bal_CL[best_L, layers_L] - bal_CL[0] < min_gain, 0, best_L)
    return cands_CLS[best_L, layers_L]


def _fresh_where_it_may_win(fresh: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], current_LS: torch.Tensor,
                            sticky_LS: torch.Tensor, load_LE: torch.Tensor, bound_L: torch.Tensor | None,
                            searched_L: torch.Tensor, remote_CL: torch.Tensor | None, *, num_gpus: int,
                            copy_cost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fresh plan [L, S] (the deployed map where not made), [L] where it was made): see
    :func:`choose_per_layer`; ``remote_CL`` [2, L] is the remote cost of the deployed and sticky plans."""
    num_slots = current_LS.shape[1]
    planned_L = searched_L
    if bound_L is not None:
        known_CL = torch.stack([_balancedness(current_LS, load_LE, num_gpus), _balancedness(
            sticky_LS, load_LE, num_gpus) - copy_cost * (sticky_LS != current_LS).sum(-1) / num_slots])
        if remote_CL is not None:
            known_CL = known_CL - remote_CL
        planned_L = planned_L & (bound_L - copy_cost * _FRESH_MIN_COPIES > known_CL.max(0).values)
    if not callable(fresh):
        return fresh, planned_L
    fresh_LS = current_LS.clone()
    if bool(planned_L.any()):
        rows = torch.nonzero(planned_L).squeeze(1)
        fresh_LS[rows] = fresh(rows)
    return fresh_LS, planned_L


def relabel(new_LS: torch.Tensor, current_LS: torch.Tensor | None, *, num_gpus: int, num_nodes: int,
            home_E: torch.Tensor | None = None, copy_weight: float = 1.0, home_weight: float = 0.0) -> torch.Tensor:
    """Permute nodes, GPUs inside nodes and slots inside GPUs of ``new_LS`` so that as many slots as
    possible keep their deployed expert; every GPU keeps its multiset of experts. [L, S]

    With ``home_E`` and ``home_weight > 0`` the permutation maximises ``copy_weight * kept slots +
    home_weight * slots on their expert's home GPU`` instead (``current_LS`` may then be None: homes only).
    """
    num_layers, num_slots = new_LS.shape
    use_home = home_E is not None and home_weight > 0
    if current_LS is None and not use_home:
        return new_LS.clone()
    copy_weight = copy_weight if current_LS is not None else 0.0
    if not use_home:
        copy_weight, home_weight = 1.0, 0.0
    num_experts = int(new_LS.max()) + 1
    if current_LS is not None:
        num_experts = max(num_experts, int(current_LS.max()) + 1)
    if use_home:
        num_experts = max(num_experts, home_E.numel())
    per_gpu = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    new_LGT = new_LS.view(num_layers, num_gpus, per_gpu)
    old_LGT = current_LS.view(num_layers, num_gpus, per_gpu) if current_LS is not None else None
    if num_nodes > 1:
        overlap = torch.zeros(num_layers, num_nodes, num_nodes, dtype=torch.float64)
        if old_LGT is not None and copy_weight > 0:
            new_node = _presence(new_LGT, num_experts).view(num_layers, num_nodes, gpus_per_node, -1).sum(2)
            old_node = _presence(old_LGT, num_experts).view(num_layers, num_nodes, gpus_per_node, -1).sum(2)
            overlap += copy_weight * torch.minimum(new_node.unsqueeze(2), old_node.unsqueeze(1)).sum(-1)
        if use_home:
            home_node = (home_E[new_LGT] // gpus_per_node).view(num_layers, num_nodes, -1)
            overlap += home_weight * _histogram(home_node, num_nodes)
        node_perm_LN = _assign(overlap)
        new_LGT = _permute_blocks(new_LGT.view(num_layers, num_nodes, gpus_per_node, per_gpu), node_perm_LN)
        new_LGT = new_LGT.view(num_layers, num_gpus, per_gpu)
    rows = num_layers * num_nodes
    new_RGT = new_LGT.reshape(rows, gpus_per_node, per_gpu)
    overlap_RGG = torch.zeros(rows, gpus_per_node, gpus_per_node, dtype=torch.float32)
    if old_LGT is not None and copy_weight > 0:
        # GPU overlap [rows, new GPU, old GPU]: for every new slot, which old GPUs of the node hold its
        # expert (a gather of T rows per new GPU instead of a product over all E experts).
        old_holds = torch.zeros(rows, num_experts * gpus_per_node, dtype=torch.bool)
        old_RGT = old_LGT.reshape(rows, gpus_per_node, per_gpu)
        old_holds.scatter_(1, (old_RGT * gpus_per_node + torch.arange(gpus_per_node).view(1, -1, 1)).view(rows, -1),
                           True)
        holds_REG = old_holds.view(rows, num_experts, gpus_per_node)
        overlap_RGG += copy_weight * holds_REG[torch.arange(rows).view(-1, 1, 1), new_RGT].sum(2, dtype=torch.float32)
    if use_home:  # slots of new GPU a whose home is GPU b of the same node (nodes already in place)
        home_RGT = home_E[new_RGT] - (torch.arange(rows) % num_nodes * gpus_per_node).view(-1, 1, 1)
        home_RGT = torch.where((home_RGT >= 0) & (home_RGT < gpus_per_node), home_RGT, gpus_per_node)
        overlap_RGG += home_weight * _histogram(home_RGT, gpus_per_node + 1)[..., :gpus_per_node].float()
    gpu_perm = _assign(overlap_RGG)
    new_RAT = _permute_blocks(new_RGT, gpu_perm)
    if old_LGT is None:
        return new_RAT.reshape(num_layers, num_slots)
    aligned = _align_slots(new_RAT.reshape(-1, per_gpu), old_LGT.reshape(-1, per_gpu))
    return aligned.view(num_layers, num_slots)


def _histogram(index_RAT: torch.Tensor, size: int) -> torch.Tensor:
    """[R, A, size] float64: how many entries of every row of ``index_RAT`` [R, A, T] equal each value."""
    out = torch.zeros(*index_RAT.shape[:2], size, dtype=torch.float64)
    return out.scatter_add_(2, index_RAT, torch.ones_like(index_RAT, dtype=torch.float64))


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
