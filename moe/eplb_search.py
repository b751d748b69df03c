"""Local search of the EPLB planner: moves on the most loaded GPU that lower the max, for all layers at once.

Runs after the greedy packing of a fresh plan (every improving move). Its sticky mode (from the deployed
placement; moves ranked by balancedness gain per new weight copy, only while worth their copies, within a
budget) is the one-move-per-iteration reference of :func:`dualmoe.moe.eplb_sticky.sticky_search`, which
migration-aware planning uses and which shares :func:`_best_replace` and the search state from here.

Model and legend as in :mod:`dualmoe.moe.eplb_pack`; W are the rows still moving, p the slots of one
pack, Q the partner slots in pack-minor order (q = k * P + h).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["local_search"]

_INF = float("inf")
_PAIR_ROUNDS = 1
_BIG = 1e30  # finite stand-ins for +-inf (float32-safe): big - big stays finite, so no NaN in gain arithmetic
_NEG = -1e30
_TOL = 1e-6  # a move must lower the top pack by more than this fraction of its load (float32 gains)


def local_search(
    slot_expert_RS: torch.Tensor,
    count_RE: torch.Tensor,
    load_RE: torch.Tensor,
    *,
    num_packs: int,
    cap: int,
    current_RS: torch.Tensor | None = None,
    copy_penalty: float = 0.0,
    budget_R: torch.Tensor | None = None,
    domain_P: torch.Tensor | None = None,
    max_iters: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Improve a placement by moves that lower the most loaded pack; returns (slot_expert_RS, count_RE).

    Each iteration applies, per row, the best of two move kinds on the most loaded pack ``g``:
    * swap: exchange a replica on ``g`` with a lighter replica on another pack ``h`` (2 slots change);
    * replace: a replica on ``g`` of an expert with >= 2 replicas becomes a new replica of another expert
      (1 slot changes; replica counts change, so every host of both experts changes load).
    A move is taken only if no pack it touches ends at or above the old maximum and it never puts a second
    replica of an expert on a pack. So the sorted pack loads fall lexicographically and the search ends.
    Rows that found no move drop out of the working set.

    With ``current_RS`` (the deployed placement) moves are scored as balancedness gain minus
    ``copy_penalty`` per slot that would newly differ from ``current_RS``, rows stop at ``budget_R``
    changed slots, and only moves with a positive net score are taken. ``domain_P`` (node of each pack,
    packs of a node contiguous) keeps swaps inside a node and new replicas on nodes already hosting the expert.
    """
    num_rows, num_slots = slot_expert_RS.shape
    num_experts = load_RE.shape[1]
    cap = max(cap, -(-num_slots // num_experts))
    ctx = _Context.build(num_rows, num_packs, num_slots, num_experts, cap, domain_P, copy_penalty)
    out_slot, out_count = slot_expert_RS.clone(), count_RE.clone()
    # Loads are scaled to <= 1 per row: the big candidate tensors are float32 (half the memory traffic).
    load_RE = load_RE.to(torch.float64)
    load_RE = load_RE / load_RE.amax(-1, keepdim=True).clamp(min=1e-300)
    # Fresh plans first descend with swaps only (cheaper iterations), then with both move kinds.
    phases = (True,) if current_RS is not None else (False, True)
    for with_replace in phases:
        presence = torch.zeros(num_rows, num_packs * num_experts, dtype=torch.int8)
        presence.scatter_add_(1, ctx.slot_pack_S * num_experts + out_slot, torch.ones_like(out_slot, dtype=torch.int8))
        work = _Work(out_slot.clone(), out_count.clone(), presence.view(num_rows, num_packs, num_experts), load_RE,
                     current_RS, budget_R)
        if not with_replace and domain_P is None:
            for _ in range(_PAIR_ROUNDS):
                if not _pair_round(work, ctx):
                    break
        rows_W = torch.arange(num_rows)  # the working set: rows still moving; shrunk when half are done
        for _ in range(max_iters):
            move = _best_moves(work, ctx, with_replace=with_replace)
            if not bool(move.take_W.any()):
                break
            _apply_move(work, move, ctx.per_pack)
            if 2 * int(move.take_W.sum()) <= move.take_W.numel():
                work.write_back(out_slot, out_count, rows_W)
                rows_W = rows_W[move.take_W]
                work = work.select(move.take_W)
            work.write_back(out_slot, out_count, rows_W)
    return out_slot, out_count


@dataclass(slots=True)
class _Work:
    """Mutable search state of the rows still moving."""

    slot_expert: torch.Tensor  # [W, S]
    count: torch.Tensor  # [W, E]
    presence: torch.Tensor  # [W, P, E] int8 replicas of every expert on every pack
    load: torch.Tensor  # [W, E] float64
    current: torch.Tensor | None  # [W, S]
    budget: torch.Tensor | None  # [W]

    def select(self, keep_W: torch.Tensor) -> _Work:
        fields = (self.slot_expert, self.count, self.presence, self.load, self.current, self.budget)
        return _Work(*(None if t is None else t[keep_W] for t in fields))

    def write_back(self, out_slot: torch.Tensor, out_count: torch.Tensor, rows_W: torch.Tensor) -> None:
        out_slot[rows_W] = self.slot_expert
        out_count[rows_W] = self.count


@dataclass(slots=True)
class _Context:
    """Constants and scratch buffers of one search. The big [rows, p, Q] candidate tensors are written
    into reused buffers: fresh multi-MB allocations page-fault on every iteration and cost ~10x the math.
    Partner columns are ordered q = k * P + h (slot k of pack h) so reductions over a pack's slots run
    over a middle dimension with the long pack dimension innermost."""

    num_packs: int
    per_pack: int
    num_experts: int
    cap: int
    domain_P: torch.Tensor | None
    copy_penalty: float
    slot_pack_S: torch.Tensor
    slot_of_Q: torch.Tensor
    diff: torch.Tensor  # [rows, p, Q] float32
    gain: torch.Tensor  # [rows, p, Q] float32
    rep_gain: torch.Tensor  # [rows, p, E] float32
    rep_tmp: torch.Tensor  # [rows, p, E] float32

    @staticmethod
    def build(num_rows: int, num_packs: int, num_slots: int, num_experts: int, cap: int,
              domain_P: torch.Tensor | None, copy_penalty: float) -> _Context:
        per_pack = num_slots // num_packs
        slot_of_Q = (torch.arange(per_pack).unsqueeze(1) + torch.arange(num_packs) * per_pack).flatten()
        big, rep = (num_rows, per_pack, num_slots), (num_rows, per_pack, num_experts)
        return _Context(
            num_packs, per_pack, num_experts, cap, domain_P, copy_penalty, torch.arange(num_slots) // per_pack,
            slot_of_Q, *(torch.empty(size, dtype=torch.float32) for size in (big, big, rep, rep)),
        )


@dataclass(slots=True)
class _Move:
    """The chosen move of every working row: slot_i (on the top pack) gets expert_b; for a swap, slot_j
    gets slot_i's expert."""

    take_W: torch.Tensor
    is_swap_W: torch.Tensor
    slot_i_W: torch.Tensor
    slot_j_W: torch.Tensor
    expert_b_W: torch.Tensor
    top_pack_W: torch.Tensor


@dataclass(slots=True)
class _Top:
    """Per-iteration view of every working row around its most loaded ("top") pack."""

    rows_W: torch.Tensor
    slot_load_WS: torch.Tensor  # float64 load of every slot
    pack_load_WP: torch.Tensor
    top_W: torch.Tensor  # load of the top pack
    pack_W: torch.Tensor  # index of the top pack
    slot_Wp: torch.Tensor  # its slots
    expert_Wp: torch.Tensor  # their experts
    load_Wp: torch.Tensor  # their loads
    on_top_WE: torch.Tensor  # int8 replicas of every expert on the top pack
    hosts_WPp: torch.Tensor  # int8 replicas of each top-slot expert on every pack
    mean_W: torch.Tensor | None = None  # sticky mode only from here on
    left_W: torch.Tensor | None = None  # changed slots still allowed (None: no budget)
    current_Wp: torch.Tensor | None = None  # deployed experts of the top slots
    moved_Wp: torch.Tensor | None = None  # 1.0 where a top slot already differs from the deployed one


def _find_top(w: _Work, ctx: _Context) -> _Top:
    num_rows = w.slot_expert.shape[0]
    rows_W = torch.arange(num_rows)
    slot_load_WS = (w.load / w.count).gather(1, w.slot_expert)
    pack_load_WP = slot_load_WS.view(num_rows, ctx.num_packs, ctx.per_pack).sum(-1)
    top_W, pack_W = pack_load_WP.max(-1)
    slot_Wp = pack_W.unsqueeze(1) * ctx.per_pack + torch.arange(ctx.per_pack)
    expert_Wp = w.slot_expert.gather(1, slot_Wp)
    top = _Top(rows_W, slot_load_WS, pack_load_WP, top_W, pack_W, slot_Wp, expert_Wp, slot_load_WS.gather(1, slot_Wp),
               w.presence[rows_W, pack_W], w.presence.gather(2, expert_Wp.unsqueeze(1).expand(-1, ctx.num_packs, -1)))
    if w.current is not None:
        top.mean_W = w.load.sum(-1) / ctx.num_packs
        top.left_W = w.budget - (w.slot_expert != w.current).sum(-1) if w.budget is not None else None
        top.current_Wp = w.current.gather(1, slot_Wp)
        top.moved_Wp = (expert_Wp != top.current_Wp).to(torch.float32)
    return top


def _best_moves(w: _Work, ctx: _Context, *, with_replace: bool) -> _Move:
    """Best move on the most loaded pack of every working row (see :func:`local_search`)."""
    top = _find_top(w, ctx)
    rows_W = top.rows_W
    swap_score_W, swap_i_W, swap_j_W, swap_gain_W = _best_swap(w, ctx, top)
    if with_replace:
        replace_score_W, replace_i_W, replace_b_W, replace_gain_W = _best_replace(w, ctx, top)
        is_swap_W = swap_score_W >= replace_score_W
    else:
        replace_score_W = swap_score_W
        replace_i_W = replace_b_W = swap_i_W
        replace_gain_W = swap_gain_W
        is_swap_W = torch.ones_like(swap_i_W, dtype=torch.bool)
    slot_i_W = top.slot_Wp[rows_W, torch.where(is_swap_W, swap_i_W, replace_i_W)]
    slot_j_W = torch.where(is_swap_W, swap_j_W, slot_i_W)
    expert_b_W = torch.where(is_swap_W, w.slot_expert[rows_W, swap_j_W], replace_b_W)
    # Taking only clear float64 gains (the candidate scores are float32) keeps the descent strict.
    gain_W = torch.where(is_swap_W, swap_gain_W, replace_gain_W)
    take_W = gain_W > _TOL * top.top_W
    if w.current is not None:  # the exact net score of the chosen move, and the budget
        expert_a_W = w.slot_expert[rows_W, slot_i_W]
        cur_i_W, cur_j_W = w.current[rows_W, slot_i_W], w.current[rows_W, slot_j_W]
        new_j_W = torch.where(is_swap_W, expert_a_W, expert_b_W)
        old_j_W = torch.where(is_swap_W, expert_b_W, expert_a_W)
        changes_W = (expert_b_W != cur_i_W).long() - (expert_a_W != cur_i_W).long()
        changes_W += torch.where(is_swap_W, (new_j_W != cur_j_W).long() - (old_j_W != cur_j_W).long(), 0)
        mean_W, top_W = top.mean_W, top.top_W
        net_W = mean_W / (top_W - gain_W).clamp(min=1e-300) - mean_W / top_W
        take_W &= net_W - ctx.copy_penalty * changes_W.clamp(min=0) > 0
        if top.left_W is not None:
            take_W &= changes_W <= top.left_W
    return _Move(take_W, is_swap_W, slot_i_W, slot_j_W, expert_b_W, top.pack_W)


def _best_swap(w: _Work, ctx: _Context, top: _Top) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best swap per row: (score_W, top-slot index_W, partner slot_W, float64 gain_W).

    Swapping top slot p (expert a, load x) with slot j (expert b, load y) on pack h lowers the max load by
    min(x - y, room_h - (x - y)), room_h = top - load_h; blocked if b is on the top pack or a on h.
    """
    num_rows, per_pack, num_packs = top.rows_W.shape[0], ctx.per_pack, ctx.num_packs
    room_WP = top.top_W.unsqueeze(1) - top.pack_load_WP
    if ctx.domain_P is not None:
        room_WP.masked_fill_(ctx.domain_P.unsqueeze(0) != ctx.domain_P[top.pack_W].unsqueeze(1), _NEG)
    partner_WS = top.slot_load_WS.masked_fill(top.on_top_WE.gather(1, w.slot_expert) > 0, _BIG)
    diff, score = ctx.diff[:num_rows], ctx.gain[:num_rows]
    torch.sub(top.load_Wp.float().unsqueeze(2), partner_WS[:, ctx.slot_of_Q].float().unsqueeze(1), out=diff)
    torch.sub(room_WP.float().repeat(1, per_pack).unsqueeze(1), diff, out=score)
    torch.minimum(diff, score, out=score)
    if w.current is not None:  # gain per new copy: 2 - moved_p - moved_j slots start to differ (0 counts 1/2)
        moved_WQ = (w.slot_expert != w.current).to(torch.float32)[:, ctx.slot_of_Q]
        need = ctx.diff[:num_rows]
        torch.add(top.moved_Wp.unsqueeze(2), moved_WQ.unsqueeze(1), out=need)
        need.neg_().add_(2.0)
        if top.left_W is not None:  # over budget: blocked
            score.sub_(torch.gt(need, top.left_W.float().view(-1, 1, 1)).float().mul_(_BIG))
        score.div_(need.clamp_(min=0.5))
    # Best partner per (top slot p, pack h); then block the pairs whose pack h already hosts expert a.
    by_pack = score.view(num_rows, per_pack, per_pack, num_packs).amax(2)
    by_pack.masked_fill_(top.hosts_WPp.transpose(1, 2) > 0, -_INF)
    best_W = by_pack.view(num_rows, -1).amax(-1)
    pair_W = by_pack.view(num_rows, -1).argmax(-1)
    i_W, h_W = pair_W // num_packs, pair_W % num_packs
    in_pack_W = score[top.rows_W, i_W].view(num_rows, per_pack, num_packs)[top.rows_W, :, h_W].argmax(-1)
    j_W = h_W * per_pack + in_pack_W
    diff_W = top.load_Wp[top.rows_W, i_W] - top.slot_load_WS[top.rows_W, j_W]
    gain_W = torch.minimum(diff_W, room_WP[top.rows_W, h_W] - diff_W)
    return best_W, i_W, j_W, gain_W


def _best_replace(w: _Work, ctx: _Context, top: _Top) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best replacement per row: (score_W, top-slot index_W, new expert_W, float64 gain_W).

    Replacing top slot p (expert a with c >= 2 replicas) by a new replica of expert b lowers the top pack
    by x - rise * (copies of a on it - 1) - w_b / (c_b + 1); every other host of a rises by
    rise = w_a / (c - 1) - w_a / c, and a host of both a and b falls by b's share change. The highest other
    host of a is evaluated exactly, the second highest without its possible fall (a safe bound).
    """
    num_rows, num_packs = top.pack_load_WP.shape
    rows_W = top.rows_W
    count_a = w.count.gather(1, top.expert_Wp)
    rise_Wp = w.load.gather(1, top.expert_Wp) / (count_a - 1).clamp(min=1) - top.load_Wp
    hosts_WPp = top.hosts_WPp.clone()
    hosts_WPp[rows_W, top.pack_W] = 0
    host_val = torch.where(hosts_WPp > 0, top.pack_load_WP.unsqueeze(2) + hosts_WPp * rise_Wp.unsqueeze(1), _NEG)
    if num_packs >= 2:
        best2 = host_val.topk(2, dim=1)
        first_Wp, second_Wp, first_pack_Wp = best2.values[:, 0], best2.values[:, 1], best2.indices[:, 0]
    else:
        first_Wp, second_Wp = host_val[:, 0], torch.full_like(host_val[:, 0], _NEG)
        first_pack_Wp = torch.zeros_like(top.slot_Wp)
    first_Wp = first_Wp.masked_fill(count_a < 2, _BIG)  # an only replica cannot be replaced
    drop_Wp = top.load_Wp - (top.on_top_WE.gather(1, top.expert_Wp) - 1) * rise_Wp
    blocked_WE = (top.on_top_WE > 0) | (w.count >= ctx.cap)
    if ctx.domain_P is not None:
        num_domains = int(ctx.domain_P.max()) + 1
        node_has = w.presence.view(num_rows, num_domains, -1, ctx.num_experts).sum(2, dtype=torch.int32) > 0
        blocked_WE |= ~node_has[rows_W, ctx.domain_P[top.pack_W]]
    new_share_WE = w.load / (w.count + 1)
    fall_WE = w.load / w.count - new_share_WE
    new_share_WE.masked_fill_(blocked_WE, _BIG)
    first_rows = (rows_W.unsqueeze(1) * num_packs + first_pack_Wp).view(-1)  # (index_select: ~20x a gather)
    b_on_first = w.presence.view(-1, ctx.num_experts).index_select(0, first_rows).view(num_rows, -1, ctx.num_experts)
    score, tmp = ctx.rep_gain[:num_rows], ctx.rep_tmp[:num_rows]
    torch.mul(b_on_first, fall_WE.float().unsqueeze(1), out=score)
    torch.sub(first_Wp.float().unsqueeze(2), score, out=score)
    torch.maximum(score, second_Wp.float().unsqueeze(2), out=score)
    torch.sub(top.top_W.float().view(-1, 1, 1), score, out=score)  # room left under the top by a's hosts
    torch.sub(drop_Wp.float().unsqueeze(2), new_share_WE.float().unsqueeze(1), out=tmp)
    torch.minimum(score, tmp, out=score)
    if w.current is not None:  # gain per new copy (1 - moved_p); no budget left: blocked
        need_Wp = 1.0 - top.moved_Wp
        if top.left_W is not None:
            score.sub_(((top.left_W < 1).unsqueeze(1) & (need_Wp > 0)).float().mul_(_BIG).unsqueeze(2))
        score.div_(need_Wp.clamp(min=0.5).unsqueeze(2))
    best_Wp = score.amax(-1)  # two-stage argmax (a flat one is ~6x slower); same first-index tie-break
    best_W, i_W = best_Wp.max(-1)
    b_W = score[rows_W, i_W].argmax(-1)
    hosts_after_W = torch.maximum(
        first_Wp[rows_W, i_W] - b_on_first[rows_W, i_W, b_W] * fall_WE[rows_W, b_W], second_Wp[rows_W, i_W]
    )
    gain_W = torch.minimum(drop_Wp[rows_W, i_W] - new_share_WE[rows_W, b_W], top.top_W - hosts_after_W)
    return best_W, i_W, b_W, gain_W


def _pair_round(w: _Work, ctx: _Context) -> bool:
    """Pair the heaviest pack with the lightest, the 2nd with the 2nd lightest, ... and apply in every pair
    the best swap lowering the pair's max (pairs are disjoint, so all swaps apply at once). Cheap bulk
    balancing before the one-move-per-iteration search; returns whether any swap was made."""
    num_rows = w.slot_expert.shape[0]
    per_pack, num_packs = ctx.per_pack, ctx.num_packs
    half = num_packs // 2
    if half == 0:
        return False
    slot_load_WS = (w.load / w.count).gather(1, w.slot_expert)
    pack_load_WP = slot_load_WS.view(num_rows, num_packs, per_pack).sum(-1)
    order_WP = torch.sort(pack_load_WP, dim=-1, descending=True, stable=True).indices
    heavy_WH, light_WH = order_WP[:, :half], order_WP.flip(-1)[:, :half]
    in_pack = torch.arange(per_pack)
    heavy_slot = (heavy_WH.unsqueeze(2) * per_pack + in_pack).view(num_rows, -1)  # [W, H * per]
    light_slot = (light_WH.unsqueeze(2) * per_pack + in_pack).view(num_rows, -1)
    x = slot_load_WS.gather(1, heavy_slot).view(num_rows, half, per_pack, 1)
    y = slot_load_WS.gather(1, light_slot).view(num_rows, half, 1, per_pack)
    expert_a = w.slot_expert.gather(1, heavy_slot).view(num_rows, half, per_pack)
    expert_b = w.slot_expert.gather(1, light_slot).view(num_rows, half, per_pack)
    flat_presence = w.presence.view(num_rows, -1)
    b_on_heavy = flat_presence.gather(1, (heavy_WH.unsqueeze(2) * ctx.num_experts + expert_b).view(num_rows, -1))
    a_on_light = flat_presence.gather(1, (light_WH.unsqueeze(2) * ctx.num_experts + expert_a).view(num_rows, -1))
    room = (pack_load_WP.gather(1, heavy_WH) - pack_load_WP.gather(1, light_WH)).view(num_rows, half, 1, 1)
    diff = x - y
    gain = torch.minimum(diff, room - diff)
    gain.masked_fill_((b_on_heavy > 0).view(num_rows, half, 1, per_pack), _NEG)
    gain.masked_fill_((a_on_light > 0).view(num_rows, half, per_pack, 1), _NEG)
    best, flat = gain.view(num_rows, half, -1).max(-1)
    top_W = pack_load_WP.gather(1, order_WP[:, :1])
    take = best > _TOL * top_W
    if not bool(take.any()):
        return False
    row, pair = torch.nonzero(take, as_tuple=True)
    i, j = flat[row, pair] // per_pack, flat[row, pair] % per_pack
    slot_i = heavy_WH[row, pair] * per_pack + i
    slot_j = light_WH[row, pair] * per_pack + j
    a, b = expert_a[row, pair, i], expert_b[row, pair, j]
    w.slot_expert[row, slot_i] = b
    w.slot_expert[row, slot_j] = a
    one = torch.ones_like(row, dtype=torch.int8)
    for pack, expert, delta in ((heavy_WH[row, pair], a, -one), (heavy_WH[row, pair], b, one),
                                (light_WH[row, pair], b, -one), (light_WH[row, pair], a, one)):
        w.presence.index_put_((row, pack, expert), delta, accumulate=True)
    return True


def _apply_move(w: _Work, move: _Move, per_pack: int) -> None:
    """Apply the chosen move of every row where ``take_W`` (in place)."""
    rows = torch.nonzero(move.take_W).squeeze(1)
    is_swap = move.is_swap_W[rows]
    slot_i, slot_j, expert_b = move.slot_i_W[rows], move.slot_j_W[rows], move.expert_b_W[rows]
    expert_a = w.slot_expert[rows, slot_i]
    w.slot_expert[rows, slot_i] = expert_b
    w.slot_expert[rows, slot_j] = torch.where(is_swap, expert_a, expert_b)
    one = torch.ones_like(rows)
    swap_one = is_swap.to(torch.int64)
    top = move.top_pack_W[rows]
    other = slot_j // per_pack
    for pack, expert, delta in ((top, expert_a, -one), (top, expert_b, one), (other, expert_b, -swap_one),
                                (other, expert_a, swap_one)):
        w.presence.index_put_((rows, pack, expert), delta.to(torch.int8), accumulate=True)
    w.count.index_put_((rows, expert_a), swap_one - one, accumulate=True)
    w.count.index_put_((rows, expert_b), one - swap_one, accumulate=True)
