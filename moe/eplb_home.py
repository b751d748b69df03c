"""Home swaps of the EPLB planner (training): bring remote replicas onto their expert's home rank.

In training every logical expert's trainable weights live on a fixed *home* rank; a slot on any other
rank is a *remote* copy refreshed from the home (and its gradient sent home) every step. With
``remote_cost > 0`` a plan pays ``remote_cost / S`` per remote slot, and :func:`home_swaps` exchanges a
remote replica with a slot on its home rank wherever the full objective
``balancedness - copy_cost * changed / S - remote_cost * remote / S`` rises, several disjoint swaps per
layer and iteration (:mod:`dualmoe.moe.eplb_migrate` calls it on the sticky and fresh candidates).

Legend (shape suffixes): L layers, E logical experts, S slots, G GPUs, R rows (layers) still moving,
T slots of one GPU, M swaps to apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["home_swaps", "num_remote"]

_HOME_SWAP_TOL = 1e-12  # a home swap must raise the objective by more than this
_MATCH_ROUNDS = 2  # rounds of matching home swaps on disjoint GPU pairs per iteration
_HOME_BLOCKED = 1e30  # subtracted from the score of a blocked home swap


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
