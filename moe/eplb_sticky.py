"""Sticky local search of the EPLB planner: from the deployed placement, the moves worth their weight copies,
several per layer and iteration, for all layers at once.

The moves and their scores are those of :func:`dualmoe.moe.eplb_search.local_search` in sticky mode (swaps,
and replacements on the most loaded GPU; balancedness gain per newly copied slot, taken while it beats
``copy_penalty``). What differs is the schedule. The one-move search changes one GPU per layer and
iteration and needs ~one iteration per move (up to ~90 at 15 % copies); every iteration costs ~150 small
tensor ops, which is most of the time. Here every iteration also moves the next most loaded GPUs
("sources", up to ``_SOURCES`` per layer, spread evenly over the nodes of the hierarchical policy):

* source k (loads L_1 >= L_2 >= ...) takes its best swap with a partner GPU of its node that no earlier
  move of the layer touches, if that scores at least 70 % of its best swap (the first source keeps its
  best move, swap or replacement, as before);
* per layer the moves of sources 1..k are applied together while each is taken on its own merits (gain
  per copy, budget), and every GPU that an earlier move touched ends below L_k.

Then every applied move is one the one-move search considers once its GPU is the most loaded, the sorted
GPU loads fall lexicographically (so the search ends), and the iterations drop 2-4 fold (DeepSeek-V3
shape, 32 GPUs: 49 -> ~15 global, 25 -> ~9 hierarchical) at the same balancedness and copies within the
noise of the greedy search (benchmark grid: objective within 0.0004, mostly within 0.0001).

Legend as in :mod:`dualmoe.moe.eplb_pack`; W rows (layers) still moving, K sources per row, p slots of a
GPU ("pack"), Q the partner slots of a source's domain (all slots without domains) in pack-minor order
(q = t * Pd + h: slot t of the domain's pack h), Pd packs per domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dualmoe.moe.eplb_search import _BIG, _INF, _TOL, _best_replace, _Context, _Top, _Work

__all__ = ["sticky_search"]

_SOURCES = 4  # GPUs per layer that may move in one iteration
_SECOND_CHOICE = 0.7  # a later source may take a partner scoring at least this share of its best one
_BLOCKED = -1e20  # scores below are blocked moves (-1e30 scaled by copy factors); real ones are > -100


def sticky_search(
    current_RS: torch.Tensor,
    load_RE: torch.Tensor,
    *,
    num_packs: int,
    cap: int,
    copy_penalty: float,
    budget_R: torch.Tensor | None = None,
    domain_P: torch.Tensor | None = None,
    max_iters: int = 1000,
) -> torch.Tensor:
    """Moves from the deployed placement ``current_RS`` [R, S] that lower the most loaded GPUs while each is
    worth ``copy_penalty`` balancedness per newly changed slot; returns the new placement [R, S].

    ``budget_R`` caps the changed slots per row; ``domain_P`` (node of each GPU, nodes contiguous) keeps
    swaps inside a node and new replicas on nodes that already host the expert; ``cap`` bounds the
    replicas of an expert. See the module docstring for the schedule.
    """
    num_rows, num_slots = current_RS.shape
    num_experts = load_RE.shape[1]
    count_RE = torch.zeros(num_rows, num_experts, dtype=torch.int64)
    count_RE.scatter_add_(1, current_RS, torch.ones_like(current_RS))
    cap = max(cap, -(-num_slots // num_experts))
    ctx = _Context.build(0, num_packs, num_slots, num_experts, cap, domain_P, copy_penalty)
    sources = _Sources.build(num_rows, num_packs, ctx.per_pack, domain_P)
    ctx.rep_gain, ctx.rep_tmp = (torch.empty(num_rows, ctx.per_pack, num_experts) for _ in range(2))
    load_RE = load_RE.to(torch.float64)
    load_RE = load_RE / load_RE.amax(-1, keepdim=True).clamp(min=1e-300)  # float32 candidates: loads <= 1
    presence = torch.zeros(num_rows, num_packs * num_experts, dtype=torch.int8)
    presence.scatter_add_(1, ctx.slot_pack_S * num_experts + current_RS, torch.ones_like(current_RS, dtype=torch.int8))
    work = _Work(current_RS.clone(), count_RE, presence.view(num_rows, num_packs, num_experts), load_RE,
                 current_RS, budget_R)
    out = current_RS.clone()
    rows_W = torch.arange(num_rows)  # the working set: rows still moving; shrunk when a quarter are done
    for _ in range(max_iters):
        move = _moves(work, ctx, sources)
        moving_W = move.take_WK[:, 0]
        if not bool(moving_W.any()):
            break
        _apply(work, move, ctx.per_pack)
        if 4 * int(moving_W.sum()) <= 3 * moving_W.numel():
            out[rows_W] = work.slot_expert
            rows_W = rows_W[moving_W]
            work = work.select(moving_W)
    out[rows_W] = work.slot_expert
    return out


@dataclass(slots=True)
class _Sources:
    """How sources are picked and where their partners are: the ``num_sources`` most loaded packs;
    ``slot_DQ`` [D, Q] the partner slots of every domain in pack-minor order."""

    num_domains: int
    packs_per_domain: int
    num_sources: int
    slot_DQ: torch.Tensor
    low: torch.Tensor  # scratch [W * K * p * Q] float32 (reused: fresh allocations page-fault every time)
    high: torch.Tensor

    @staticmethod
    def build(num_rows: int, num_packs: int, per_pack: int, domain_P: torch.Tensor | None) -> _Sources:
        num_domains = 1 if domain_P is None else int(domain_P.max()) + 1
        packs_per_domain = num_packs // num_domains
        num_sources = max(1, min(_SOURCES, num_packs // 2, packs_per_domain - 1))
        slot_DQ = (torch.arange(per_pack).view(-1, 1, 1) + torch.arange(num_packs).view(num_domains, -1) * per_pack)
        slot_DQ = slot_DQ.transpose(0, 1).reshape(num_domains, -1)
        size = num_rows * num_sources * per_pack * slot_DQ.shape[1]
        return _Sources(num_domains, packs_per_domain, num_sources, slot_DQ, torch.empty(size), torch.empty(size))

    def pick(self, pack_load_WP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packs [W, K], loads [W, K]), heaviest first; stable sort: the lower pack first on ties, so
        source 0 is the row's argmax as in the one-move search."""
        load_WK, pack_WK = torch.sort(pack_load_WP, dim=-1, descending=True, stable=True)
        return pack_WK[:, :self.num_sources], load_WK[:, :self.num_sources]


@dataclass(slots=True)
class _Move:
    """The move of every (row, source): slot_i (on the source) gets expert_b; for a swap, slot_j gets
    slot_i's expert. ``take_WK`` marks the moves to apply (a prefix of the sources per row)."""

    take_WK: torch.Tensor
    is_swap_WK: torch.Tensor
    slot_i_WK: torch.Tensor
    slot_j_WK: torch.Tensor
    expert_b_WK: torch.Tensor


def _moves(w: _Work, ctx: _Context, src: _Sources) -> _Move:
    """The best move of every source and which of them apply together (module docstring)."""
    num_rows, num_packs, per_pack = w.slot_expert.shape[0], ctx.num_packs, ctx.per_pack
    rows_W = torch.arange(num_rows)
    slot_load_WS = (w.load / w.count).gather(1, w.slot_expert)
    pack_load_WP = slot_load_WS.view(num_rows, num_packs, per_pack).sum(-1)
    src_WK, level_WK = src.pick(pack_load_WP)
    slot_WKp = (src_WK * per_pack).unsqueeze(2) + torch.arange(per_pack)
    x_WKp = slot_load_WS.gather(1, slot_WKp.view(num_rows, -1)).view(slot_WKp.shape)
    a_WKp = w.slot_expert.gather(1, slot_WKp.view(num_rows, -1)).view(slot_WKp.shape)
    moved_WS = w.slot_expert != w.current
    left_W = None if w.budget is None else w.budget - moved_WS.sum(-1)
    swaps = _swaps(w, src, per_pack, slot_load_WS, pack_load_WP, src_WK, level_WK, x_WKp, a_WKp, moved_WS, left_W)
    # The most loaded pack: its best swap (any partner) or its best replacement, as in the one-move search.
    moved_Wp = moved_WS.gather(1, slot_WKp[:, 0]).to(torch.float32)
    top = _Top(rows_W, slot_load_WS, pack_load_WP, level_WK[:, 0], src_WK[:, 0], slot_WKp[:, 0], a_WKp[:, 0],
               x_WKp[:, 0], w.presence[rows_W, src_WK[:, 0]], swaps.hosts_WKpP[:, 0].transpose(1, 2),
               left_W=left_W, moved_Wp=moved_Wp)
    replace_score_W, replace_i_W, replace_b_W, replace_gain_W = _best_replace(w, ctx, top)
    swap_best_W, swap_h_W = swaps.pack_score_WKP[:, 0].max(-1)
    swap_first_W = swap_best_W >= replace_score_W
    hosts_WP = (swaps.hosts_WKpP[rows_W, 0, replace_i_W] > 0) | (w.presence[rows_W, :, replace_b_W] > 0)
    partner_WK = _partners(swaps.pack_score_WKP, src_WK, swap_h_W, swap_first_W, hosts_WP)
    # The chosen swap of every source: slot i of the source, slot t of the partner pack h.
    h_WK = partner_WK.clamp(min=0)
    local_h = (h_WK - src_WK // src.packs_per_domain * src.packs_per_domain).clamp(min=0).view(num_rows, -1, 1, 1)
    by_pack = swaps.by_pack_WKpP.gather(3, local_h.expand(-1, -1, per_pack, 1)).squeeze(3)  # [W, K, p]
    i_WK = by_pack.argmax(-1)
    rows_in = (i_WK * per_pack).unsqueeze(2) + torch.arange(per_pack)  # rows of score [W, K, p * t, Pd]
    by_slot = swaps.score.gather(2, rows_in.unsqueeze(3).expand(-1, -1, -1, swaps.score.shape[3]))
    t_WK = by_slot.gather(3, local_h.expand(-1, -1, per_pack, 1)).squeeze(3).argmax(-1)
    slot_i_WK = slot_WKp.gather(2, i_WK.unsqueeze(2)).squeeze(2)
    slot_j_WK = h_WK * per_pack + t_WK
    diff_WK = x_WKp.gather(2, i_WK.unsqueeze(2)).squeeze(2) - slot_load_WS.gather(1, slot_j_WK)
    gain_WK = torch.minimum(diff_WK, level_WK - pack_load_WP.gather(1, h_WK) - diff_WK)
    expert_b_WK = w.slot_expert.gather(1, slot_j_WK)
    valid_WK = (partner_WK >= 0) & (swaps.pack_score_WKP.gather(2, h_WK.unsqueeze(2)).squeeze(2) > -_INF)
    is_swap_WK = torch.ones_like(valid_WK)
    is_swap_WK[:, 0] = swap_first_W  # the replacement of the most loaded pack instead of its swap
    slot_i_WK[:, 0] = torch.where(swap_first_W, slot_i_WK[:, 0], slot_WKp[rows_W, 0, replace_i_W])
    slot_j_WK[:, 0] = torch.where(swap_first_W, slot_j_WK[:, 0], slot_i_WK[:, 0])
    expert_b_WK[:, 0] = torch.where(swap_first_W, expert_b_WK[:, 0], replace_b_W)
    gain_WK[:, 0] = torch.where(swap_first_W, gain_WK[:, 0], replace_gain_W)
    valid_WK[:, 0] |= ~swap_first_W
    take_WK = _taken(w, ctx, valid_WK, gain_WK, level_WK, is_swap_WK, slot_i_WK, slot_j_WK, expert_b_WK, left_W)
    return _Move(take_WK, is_swap_WK, slot_i_WK, slot_j_WK, expert_b_WK)


def _taken(w: _Work, ctx: _Context, valid_WK: torch.Tensor, gain_WK: torch.Tensor, level_WK: torch.Tensor,
           is_swap_WK: torch.Tensor, slot_i_WK: torch.Tensor, slot_j_WK: torch.Tensor, expert_b_WK: torch.Tensor,
           left_W: torch.Tensor | None) -> torch.Tensor:
    """[W, K] the moves applied: each taken on its own (a clear float64 gain, worth its new copies), then
    per row the prefix of sources whose earlier moves all end below their load, within the budget."""
    take_WK = valid_WK & (gain_WK > _TOL * level_WK)
    expert_a_WK = w.slot_expert.gather(1, slot_i_WK)
    cur_i_WK, cur_j_WK = w.current.gather(1, slot_i_WK), w.current.gather(1, slot_j_WK)
    new_j_WK = torch.where(is_swap_WK, expert_a_WK, expert_b_WK)
    old_j_WK = torch.where(is_swap_WK, expert_b_WK, expert_a_WK)
    changes_WK = (expert_b_WK != cur_i_WK).long() - (expert_a_WK != cur_i_WK).long()
    changes_WK += torch.where(is_swap_WK, (new_j_WK != cur_j_WK).long() - (old_j_WK != cur_j_WK).long(), 0)
    mean_W1 = (w.load.sum(-1) / ctx.num_packs).unsqueeze(1)
    net_WK = mean_W1 / (level_WK - gain_WK).clamp(min=1e-300) - mean_W1 / level_WK
    take_WK &= net_WK - ctx.copy_penalty * changes_WK.clamp(min=0) > 0
    if take_WK.shape[1] > 1:
        take_WK[:, 1:] &= torch.cummax(level_WK - gain_WK, 1).values[:, :-1] < level_WK[:, 1:]
    if left_W is not None:
        take_WK &= changes_WK.cumsum(1) <= left_W.unsqueeze(1)
    return take_WK.cumprod(1).bool()


@dataclass(slots=True)
class _Swaps:
    """Swap candidates of every source (see :func:`_swaps`)."""

    pack_score_WKP: torch.Tensor  # best score per partner pack (-inf outside the source's domain)
    by_pack_WKpP: torch.Tensor  # best score per (source slot, partner pack of the domain)
    score: torch.Tensor  # [W, K, p * p, Pd] every (source slot, partner slot t of the domain's pack h)
    hosts_WKpP: torch.Tensor  # int8 replicas of every source slot's expert on every pack


def _swaps(w: _Work, src: _Sources, per_pack: int, slot_load_WS: torch.Tensor, pack_load_WP: torch.Tensor,
           src_WK: torch.Tensor, level_WK: torch.Tensor, x_WKp: torch.Tensor, a_WKp: torch.Tensor,
           moved_WS: torch.Tensor, left_W: torch.Tensor | None) -> _Swaps:
    """Swap scores of every source against the slots of its domain.

    Swapping source slot i (expert a, load x) with slot j (expert b, load y) on pack h lowers the source
    load L by min(x - y, room_h - (x - y)), room_h = L - load_h, i.e. min(x - y, (L - x) + (y - load_h)),
    per new copy: 2 - moved_i - moved_j slots start to differ (0 counts 1/2), i.e. times
    (1 + moved_i) (1 + moved_j) / 2. Blocked: b on the source, a on h, h another source (after the first),
    over the budget. Bool-masked fills of the big tensors are slow on CPU: masks are folded in as -1e30."""
    num_rows, num_sources = src_WK.shape
    num_packs, num_experts = pack_load_WP.shape[1], w.presence.shape[2]
    if src.num_domains == 1:  # every source has the same partners: [W, 1, Q] tables

        def partner(table_WS: torch.Tensor) -> torch.Tensor:
            return table_WS.gather(1, src.slot_DQ.expand(num_rows, -1)).unsqueeze(1)
    else:
        flat_q = src.slot_DQ[src_WK // src.packs_per_domain].view(num_rows, -1)

        def partner(table_WS: torch.Tensor) -> torch.Tensor:
            return table_WS.gather(1, flat_q).view(num_rows, num_sources, -1)
    num_q = src.slot_DQ.shape[1]
    y_WKQ, b_WKQ = partner(slot_load_WS.float()), partner(w.slot_expert)
    slot_pack_WS = torch.arange(num_packs).repeat_interleave(per_pack).expand(num_rows, -1)
    blocked_WKQ = w.presence.view(num_rows, -1).gather(1, (src_WK.unsqueeze(2) * num_experts + b_WKQ).view(
        num_rows, -1)).view(num_rows, num_sources, num_q).to(torch.float32)
    if num_sources > 1:
        is_src_WP = torch.zeros_like(pack_load_WP, dtype=torch.float32).scatter_(1, src_WK, 1.0)
        src_WKQ = partner(is_src_WP.gather(1, slot_pack_WS))
        blocked_WKQ[:, 1:] += src_WKQ if src.num_domains == 1 else src_WKQ[:, 1:]
    e_WKQ = (y_WKQ - partner(pack_load_WP.float().gather(1, slot_pack_WS))) - blocked_WKQ * _BIG
    shape = (num_rows, num_sources, per_pack, num_q)
    size = num_rows * num_sources * per_pack * num_q
    low, score = src.low[:size].view(shape), src.high[:size].view(shape)
    torch.sub(x_WKp.float().unsqueeze(3), y_WKQ.unsqueeze(2), out=low)
    torch.add((level_WK.unsqueeze(2) - x_WKp).float().unsqueeze(3), e_WKQ.unsqueeze(2), out=score)
    torch.minimum(low, score, out=score)
    moved_WKQ = partner(moved_WS.to(torch.float32))
    moved_WKp1 = moved_WS.gather(1, (src_WK * per_pack).unsqueeze(2).add(torch.arange(per_pack)).view(
        num_rows, -1)).view(num_rows, num_sources, per_pack, 1).to(torch.float32)
    if left_W is not None and bool((left_W < 2).any()):  # over budget (2 - moved_i - moved_j > left): blocked
        torch.add(moved_WKp1, moved_WKQ.unsqueeze(2), out=low)
        score.sub_(torch.lt(low, (2 - left_W).float().view(-1, 1, 1, 1)).float().mul_(_BIG))
    score.mul_(moved_WKQ.add(1.0).mul_(0.5).unsqueeze(2))
    by_pack = score.view(num_rows, num_sources, per_pack, per_pack, src.packs_per_domain).amax(3)  # [W, K, p, Pd]
    by_pack.mul_(moved_WKp1.add(1.0))
    hosts = w.presence.gather(2, a_WKp.view(num_rows, 1, -1).expand(-1, num_packs, -1))  # [W, P, K * p]
    hosts_WKpP = hosts.view(num_rows, num_packs, num_sources, per_pack).permute(0, 2, 3, 1)
    offset_WK = src_WK // src.packs_per_domain * src.packs_per_domain
    domain_packs = (offset_WK.unsqueeze(2) + torch.arange(src.packs_per_domain)).unsqueeze(2)  # [W, K, 1, Pd]
    if src.num_domains == 1:
        by_pack.masked_fill_(hosts_WKpP > 0, -_INF)
        pack_score_WKP = by_pack.amax(2)
    else:
        by_pack.masked_fill_(hosts_WKpP.gather(3, domain_packs.expand(-1, -1, per_pack, -1)) > 0, -_INF)
        pack_score_WKP = torch.full((num_rows, num_sources, num_packs), -_INF).scatter_(
            2, domain_packs.squeeze(2), by_pack.amax(2))
    pack_score_WKP.masked_fill_(pack_score_WKP < _BLOCKED, -_INF)  # blocked partners are no partners
    return _Swaps(pack_score_WKP, by_pack, score.view(num_rows, num_sources, per_pack * per_pack, -1), hosts_WKpP)


def _partners(pack_score_WKP: torch.Tensor, src_WK: torch.Tensor, swap_h_W: torch.Tensor,
              swap_first_W: torch.Tensor, replace_hosts_WP: torch.Tensor) -> torch.Tensor:
    """[W, K] partner pack of every source (-1: none; for the top pack's replacement its own pack).

    The most loaded pack keeps its best move. Source k >= 1 takes its best partner among the packs no
    earlier move of its row touches (a replacement touches every host of both experts) if that scores at
    least ``_SECOND_CHOICE`` of its best partner overall; else, or if an earlier move touched the source
    itself, it gets -1, which ends the row's moves there (a much worse move spends copies that the
    one-move search would not)."""
    num_rows, num_sources = src_WK.shape
    rows_W = torch.arange(num_rows)
    partner_WK = torch.full((num_rows, num_sources), -1, dtype=torch.int64)
    partner_WK[:, 0] = torch.where(swap_first_W, swap_h_W, src_WK[:, 0])
    if num_sources == 1:
        return partner_WK
    used_WP = replace_hosts_WP & ~swap_first_W.unsqueeze(1)
    used_WP[rows_W, src_WK[:, 0]] = True
    used_WP[rows_W, swap_h_W] |= swap_first_W
    for k in range(1, num_sources):
        src_W1 = src_WK[:, k:k + 1]
        best_W, h_W = pack_score_WKP[:, k].masked_fill(used_WP, -_INF).max(-1)
        ok_W = ~used_WP.gather(1, src_W1).squeeze(1) & (best_W > -_INF)
        ok_W &= best_W >= _SECOND_CHOICE * pack_score_WKP[:, k].amax(-1)
        partner_WK[:, k] = torch.where(ok_W, h_W, -1)
        used_WP.scatter_(1, src_W1, True)
        used_WP[rows_W, h_W] |= ok_W
    return partner_WK


def _apply(w: _Work, move: _Move, per_pack: int) -> None:
    """Apply the moves marked in ``take_WK`` (in place; per row they touch disjoint packs)."""
    rows, k = torch.nonzero(move.take_WK, as_tuple=True)
    is_swap = move.is_swap_WK[rows, k]
    slot_i, slot_j, expert_b = move.slot_i_WK[rows, k], move.slot_j_WK[rows, k], move.expert_b_WK[rows, k]
    expert_a = w.slot_expert[rows, slot_i]
    w.slot_expert[rows, slot_i] = expert_b
    w.slot_expert[rows, slot_j] = torch.where(is_swap, expert_a, expert_b)
    one = torch.ones_like(rows)
    swap_one = is_swap.to(torch.int64)
    pack_i, pack_j = slot_i // per_pack, slot_j // per_pack
    for pack, expert, delta in ((pack_i, expert_a, -one), (pack_i, expert_b, one), (pack_j, expert_b, -swap_one),
                                (pack_j, expert_a, swap_one)):
        w.presence.index_put_((rows, pack, expert), delta.to(torch.int8), accumulate=True)
    w.count.index_put_((rows, expert_a), swap_one - one, accumulate=True)
    w.count.index_put_((rows, expert_b), one - swap_one, accumulate=True)
