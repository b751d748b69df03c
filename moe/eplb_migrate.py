"""Migration-aware side of the EPLB planner: relabel a fresh plan onto the deployed one, plan sticky
moves from the deployed one, and pick per layer what is worth its copies.

A *copy* is a slot whose logical expert changes: its weights (and, in training, whatever state moves
with them) must be fetched. GPUs are interchangeable inside a node and nodes are interchangeable, so a
fresh plan can be relabelled (nodes permuted, GPUs permuted inside a node, slots permuted inside a GPU)
without changing any GPU's load; relabelling only changes how many slots need a copy.

Home awareness (training): every logical expert's trainable weights live on a fixed *home* rank; a
slot on any other rank is a *remote* copy refreshed from the home (and its gradient sent home) every
step. With ``home_E`` and ``remote_cost > 0`` every candidate also pays ``remote_cost / S`` per remote
slot: relabelling weighs slots brought home against copies saved, and :func:`home_swaps` exchanges a
remote replica with a slot on its home rank wherever the full objective rises.

Legend (shape suffixes): L layers, E logical experts, S slots, G GPUs, N nodes, R rows, A items to
assign (nodes or GPUs), T slots of one GPU, K permutations, C candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from dualmoe.moe.eplb_pack import apportion
from dualmoe.moe.eplb_sticky import sticky_search

__all__ = ["choose_per_layer", "home_swaps", "num_remote", "relabel"]

_EXACT_ASSIGN_MAX = 6  # enumerate all permutations up to this many nodes/GPUs (720)
_EXCHANGE_ROUNDS = 8  # rounds of pairwise exchanges after the greedy assignment (one exchange per row each)
_EXCHANGE_MAX = 64  # ... only for up to this many GPUs per node
_HOME_SWAP_TOL = 1e-12  # a home swap must raise the objective by more than this
_MATCH_ROUNDS = 2  # rounds of matching home swaps on disjoint GPU pairs per iteration
_HOME_BLOCKED = 1e30  # subtracted from the score of a blocked home swap
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


def num_remote(placement_LS: torch.Tensor, home_E: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[...] int64 slots whose GPU is not their expert's home (placement [..., S])."""
    num_slots = placement_LS.shape[-1]
    gpu_S = torch.arange(num_slots) // (num_slots // num_gpus)
    return (home_E[placement_LS] != gpu_S).sum(-1)


def home_swaps(
    placement_LS: torch.Tensor,
    load_LE: torch.Tensor,
    home_E: torch.Tensor,
    *,
    num_gpus: int,
    num_nodes: int = 1,
    current_LS: torch.Tensor | None = None,
    copy_cost: float = 0.0,
    remote_cost: float,
    max_moves: int | None = None,
    max_iters: int | None = None,
) -> torch.Tensor:
    """Bring remote replicas home by swaps; returns the new map [L, S] (the input is not modified).

    A swap exchanges a slot on GPU p holding expert a whose home is h != p with a slot on h holding b;
    it is taken when it raises ``balancedness - copy_cost * changed / S - remote_cost * remote / S``, puts
    no second replica of an expert on a GPU, stays inside the node (``num_nodes`` > 1: home rank r on node
    r // (G / N)) and, with ``current_LS`` and ``max_moves``, keeps the changed slots within the budget.
    Per iteration and layer the best swap is taken, and with it swaps on other, pairwise disjoint GPU
    pairs (a matching: every remote slot's best swap that gains on homes and copies, kept where it is the
    best at both its GPUs): of those, in order of the load they leave on their GPUs, the prefix with the
    highest objective, counting the max GPU load as the higher of the best swap's new max and theirs (a
    safe bound: the GPU pairs are disjoint, so home and copy gains add up). One-swap-per-iteration needed
    up to ~70 iterations at DeepSeek-V3 shape; this takes 3-8x fewer, and it also takes groups of swaps
    that raise the max once for several slots brought home, which no single swap pays for. Only strict
    gains are taken, so the search ends; a replica of a multi-replica expert whose home already hosts
    another replica stays remote (one copy per GPU)."""
    out_LS = placement_LS.clone()
    num_layers, num_slots = out_LS.shape
    load_LE = load_LE.to(torch.float64)
    count_LE = torch.zeros(num_layers, load_LE.shape[1], dtype=torch.int64)
    count_LE.scatter_add_(1, out_LS, torch.ones_like(out_LS))
    share_LE = load_LE / count_LE.clamp(min=1)  # swaps keep replica counts
    mean_L = load_LE.sum(-1) / num_gpus
    prices = (copy_cost / num_slots, remote_cost / num_slots)
    rows = torch.arange(num_layers)
    for _ in range(num_slots if max_iters is None else max_iters):
        if rows.numel() == 0:
            break
        cur_RS = current_LS[rows] if current_LS is not None else None
        cand = _home_candidates(out_LS[rows], share_LE[rows], mean_L[rows], home_E, cur_RS, num_gpus=num_gpus,
                                num_nodes=num_nodes, prices=prices, max_moves=max_moves)
        take_R, row_M, slot_i_M, slot_j_M = _pick_home_swaps(cand, max_moves)
        if not bool(take_R.any()):
            break
        row_M = rows[row_M]
        a_M, b_M = out_LS[row_M, slot_i_M], out_LS[row_M, slot_j_M]
        out_LS[row_M, slot_i_M] = b_M
        out_LS[row_M, slot_j_M] = a_M
        rows = rows[take_R]
    return out_LS


@dataclass(slots=True)
class _HomeCandidates:
    """Home swaps of every remote slot i (GPU p, expert a, home h) with every slot j of h, [R, S, T]."""

    score: torch.Tensor  # full objective change; -inf where not allowed
    side: torch.Tensor  # the home and copy terms alone; -inf where not allowed
    new_top: torch.Tensor  # predicted max GPU load after the swap alone
    new_pair: torch.Tensor  # the higher of the two touched GPUs' loads after the swap
    dchanged: torch.Tensor  # change in slots differing from the deployed placement (0 without one)
    changed_R: torch.Tensor  # slots differing now
    slot_j: torch.Tensor  # [R, S, T] partner slots
    gpu_S: torch.Tensor  # GPU p of every slot
    home_RS: torch.Tensor  # home h of every slot's expert
    mean_R: torch.Tensor  # mean GPU load


def _home_candidates(x_RS: torch.Tensor, share_RE: torch.Tensor, mean_R: torch.Tensor, home_E: torch.Tensor,
                     cur_RS: torch.Tensor | None, *, num_gpus: int, num_nodes: int, prices: tuple[float, float],
                     max_moves: int | None) -> _HomeCandidates:
    num_rows, num_slots = x_RS.shape
    num_experts = share_RE.shape[1]
    per_gpu = num_slots // num_gpus
    gpu_S = torch.arange(num_slots) // per_gpu
    r1 = torch.arange(num_rows)
    presence_RGE = torch.zeros(num_rows, num_gpus, num_experts, dtype=torch.bool)
    presence_RGE[r1.unsqueeze(1), gpu_S, x_RS] = True
    slot_load_RS = share_RE.gather(1, x_RS)
    gpu_RG = slot_load_RS.view(num_rows, num_gpus, per_gpu).sum(-1)
    top_R = gpu_RG.max(-1).values
    home_RS = home_E[x_RS]  # h: the home of every slot's expert
    # Partner slots j: the slots of h, [R, S, T], read as rows of per-GPU tables (index_select is fast).
    pick = (r1.unsqueeze(1) * num_gpus + home_RS).view(-1)

    def on_home(table_RS: torch.Tensor) -> torch.Tensor:
        return table_RS.reshape(num_rows * num_gpus, per_gpu).index_select(0, pick).view(num_rows, num_slots, -1)

    b_RST, y_RST, home_b = on_home(x_RS), on_home(slot_load_RS), on_home(home_RS)
    # b already on p: presence of every slot's expert on every GPU, [R, G(p), G(h), T], one row per slot.
    on_gpu = presence_RGE.gather(2, x_RS.unsqueeze(1).expand(-1, num_gpus, -1))
    pair_rows = ((r1.unsqueeze(1) * num_gpus + gpu_S) * num_gpus + home_RS).view(-1)
    b_on_p = on_gpu.view(-1, per_gpu).index_select(0, pair_rows).view(num_rows, num_slots, per_gpu)
    ok_RS = (home_RS != gpu_S) & ~presence_RGE.view(num_rows, -1).gather(1, home_RS * num_experts + x_RS)
    if num_nodes > 1:
        node_G = torch.arange(num_gpus) // (num_gpus // num_nodes)
        ok_RS &= node_G[home_RS] == node_G[gpu_S]
    to_p = home_b == gpu_S.view(1, -1, 1)  # b comes home (dhome 2); b leaves its home (dhome 0): blocked
    # Blocked moves get -1e30 (bool-masked fills of big tensors are slow on CPU; arithmetic is not).
    blocked = (b_on_p | (home_b == home_RS.unsqueeze(2))).to(torch.float64).add_((~ok_RS).unsqueeze(2))
    # New max: the two touched GPUs after the swap, or the largest untouched one (top 3 suffice).
    top3_v, top3_i = gpu_RG.topk(min(3, num_gpus), dim=-1)
    touched = (top3_i.unsqueeze(1) == gpu_S.view(1, -1, 1)) | (top3_i.unsqueeze(1) == home_RS.unsqueeze(2))
    other_RS = top3_v.unsqueeze(1).masked_fill(touched, 0.0).amax(-1)
    delta_RST = slot_load_RS.unsqueeze(2) - y_RST
    new_pair = torch.maximum(gpu_RG[:, gpu_S].unsqueeze(2) - delta_RST,
                             gpu_RG.gather(1, home_RS).unsqueeze(2) + delta_RST)
    new_top = torch.maximum(new_pair, other_RS.unsqueeze(2))
    copy_price, remote_price = prices
    side = to_p.to(torch.float64).add_(1.0).mul_(remote_price)
    dchanged = torch.zeros(1, dtype=torch.float64).expand(num_rows, num_slots, per_gpu)
    changed_R = torch.zeros(num_rows, dtype=torch.int64)
    if cur_RS is not None:  # slots starting to differ: i gets b, j gets a (float64: integers, exact)
        moved_RS = (x_RS != cur_RS).to(torch.float64)
        dchanged = (b_RST != cur_RS.unsqueeze(2)).to(torch.float64).add_(x_RS.unsqueeze(2) != on_home(cur_RS))
        dchanged.sub_(on_home(moved_RS)).sub_(moved_RS.unsqueeze(2))
        side.add_(dchanged, alpha=-copy_price)
        changed_R = moved_RS.sum(-1).to(torch.int64)
        if max_moves is not None:
            blocked.add_(dchanged > max_moves - changed_R.view(-1, 1, 1))
    # Balancedness mean / max (an all-zero layer has mean 0: 0 before and after, as with 1.0 for it).
    m = mean_R.view(-1, 1, 1)
    score = (m / new_top.clamp(min=1e-300)).sub_(m / top_R.view(-1, 1, 1).clamp(min=1e-300)).add_(side)
    side.add_(blocked, alpha=-_HOME_BLOCKED)
    return _HomeCandidates(score.add_(blocked, alpha=-_HOME_BLOCKED), side, new_top, new_pair, dchanged, changed_R,
                           home_RS.unsqueeze(2) * per_gpu + torch.arange(per_gpu), gpu_S, home_RS, mean_R)


def _pick_home_swaps(cand: _HomeCandidates, max_moves: int | None) -> tuple[torch.Tensor, ...]:
    """(take_R, row_M, slot_i_M, slot_j_M): per row the best swap, plus other swaps (see :func:`home_swaps`).

    Others: every remote slot's best swap that gains on homes and copies; a matching of them (each the
    best at both its GPUs); of those, taken in order of the load they leave on their GPUs, the prefix
    with the best objective (max GPU load bounded by the best swap's new max and theirs; home and copy
    gains add up, as the GPU pairs are disjoint)."""
    num_rows, num_slots, _ = cand.score.shape
    r1 = torch.arange(num_rows)
    best_RS, t_RS = cand.score.max(-1)
    best_R, i_R = best_RS.max(-1)
    take_R = best_R > _HOME_SWAP_TOL
    t_R = t_RS[r1, i_R]
    p_RS, h_RS = cand.gpu_S.expand(num_rows, -1), cand.home_RS
    busy_RG = torch.zeros(num_rows, int(cand.gpu_S[-1]) + 1, dtype=torch.bool)
    busy_RG[r1, cand.gpu_S[i_R]] = True
    busy_RG[r1, h_RS[r1, i_R]] = True
    side_RS = cand.side.gather(2, t_RS.unsqueeze(2)).squeeze(2)
    ok_RS = (side_RS > _HOME_SWAP_TOL) & take_R.unsqueeze(1) & ~busy_RG.gather(1, p_RS) & ~busy_RG.gather(1, h_RS)
    extra_RS = torch.zeros_like(ok_RS)
    for _ in range(_MATCH_ROUNDS):  # a greedy matching: each round adds the edges best at both their GPUs
        edges_RS = _dominant_edges(best_RS.masked_fill(~ok_RS, -float("inf")), ok_RS, p_RS, h_RS, busy_RG.shape[1])
        extra_RS |= edges_RS
        row_e, slot_e = torch.nonzero(edges_RS, as_tuple=True)
        if row_e.numel() == 0:
            break
        busy_RG[row_e, p_RS[row_e, slot_e]] = True
        busy_RG[row_e, h_RS[row_e, slot_e]] = True
        ok_RS &= ~busy_RG.gather(1, p_RS) & ~busy_RG.gather(1, h_RS)
    # Extras by the load left on their GPUs; the objective of every prefix (0 extras: the best swap alone).
    pair_RS = cand.new_pair.gather(2, t_RS.unsqueeze(2)).squeeze(2).masked_fill(~extra_RS, float("inf"))
    pair_RS, order_RS = torch.sort(pair_RS, dim=-1, stable=True)
    used_RS = extra_RS.gather(1, order_RS)
    top_RS = torch.maximum(torch.cummax(pair_RS, -1).values, cand.new_top[r1, i_R, t_R].unsqueeze(1))
    mean_R1 = cand.mean_R.unsqueeze(1)
    gain_RS = (torch.where(top_RS > 0, mean_R1 / top_RS.clamp(min=1e-300), 1.0) + cand.side[r1, i_R, t_R].unsqueeze(1)
               + torch.where(used_RS, side_RS.gather(1, order_RS), 0.0).cumsum(-1))
    if max_moves is not None:
        d_RS = torch.where(used_RS, cand.dchanged.gather(2, t_RS.unsqueeze(2)).squeeze(2).gather(1, order_RS), 0)
        total_RS = (cand.changed_R + cand.dchanged[r1, i_R, t_R]).unsqueeze(1) + d_RS.cumsum(-1)
        used_RS &= (total_RS <= max_moves).cumprod(-1).bool()  # stop at the first extra over the budget
    gain_RS = gain_RS.masked_fill(~used_RS, -float("inf"))
    alone_R = torch.where(cand.new_top[r1, i_R, t_R] > 0, cand.mean_R / cand.new_top[r1, i_R, t_R].clamp(min=1e-300),
                          1.0) + cand.side[r1, i_R, t_R]
    count_R = torch.cat([alone_R.unsqueeze(1), gain_RS], 1).argmax(-1)  # fewest extras on ties
    keep_RS = torch.arange(num_slots) < count_R.unsqueeze(1)
    row_x, pos_x = torch.nonzero(keep_RS & used_RS, as_tuple=True)
    slot_x = order_RS[row_x, pos_x]
    best_rows = torch.nonzero(take_R).squeeze(1)
    row_M = torch.cat([best_rows, row_x])
    slot_i_M = torch.cat([i_R[best_rows], slot_x])
    t_M = torch.cat([t_R[best_rows], t_RS[row_x, slot_x]])
    slot_j_M = cand.slot_j[row_M, slot_i_M, t_M]
    return take_R, row_M, slot_i_M, slot_j_M


def _dominant_edges(value_RS: torch.Tensor, ok_RS: torch.Tensor, p_RS: torch.Tensor, h_RS: torch.Tensor,
                    num_gpus: int) -> torch.Tensor:
    """[R, S] the edges (GPU pairs p-h, one per slot) that are the best at both their GPUs (highest value,
    then lowest slot): a matching, holding the best edge of every row that has one."""
    num_rows, num_slots = value_RS.shape
    best_RG = torch.full((num_rows, num_gpus), -float("inf"), dtype=value_RS.dtype)
    best_RG.scatter_reduce_(1, p_RS, value_RS, "amax")
    best_RG.scatter_reduce_(1, h_RS, value_RS, "amax")
    at_p, at_h = ok_RS & (value_RS == best_RG.gather(1, p_RS)), ok_RS & (value_RS == best_RG.gather(1, h_RS))
    slot_RS = torch.arange(num_slots).expand(num_rows, -1)
    first_RG = torch.full((num_rows, num_gpus), num_slots, dtype=torch.int64)
    first_RG.scatter_reduce_(1, p_RS, torch.where(at_p, slot_RS, num_slots), "amin")
    first_RG.scatter_reduce_(1, h_RS, torch.where(at_h, slot_RS, num_slots), "amin")
    return at_p & at_h & (first_RG.gather(1, p_RS) == slot_RS) & (first_RG.gather(1, h_RS) == slot_RS)


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
