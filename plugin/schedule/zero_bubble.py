"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241): ZB-H1 and ZB-V.

Both split the backward into I (input-grad, on the critical path) and W (weight-grad, deferrable) and use the
W's to fill what would be bubbles.

**ZB-H1** ("zb1p"), one stage per rank: 1F1B with B replaced by I, and rank r holding back its first r W's.
Rank r runs min(P-r-1, m) warm-up forwards, then F, I, W pairs (the W of the backward r places earlier),
then the remaining I's (each followed by a W) and the r W's still queued. The last rank's tail of W's lets
the I's run ahead, so the cool-down bubble shrinks from (P-1)(F+B) to (P-1)(F+B-2W); peak activations stay
at P micro-batches per rank, like 1F1B. The order for P=4, m=8:

    0: 0F0 0F1 0F2 | 0F3 0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 | 0I5 0W5 0I6 0W6 0I7 0W7
    1: 1F0 1F1 | 1F2 1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 | 1I6 1W5 1I7 1W6 | 1W7
    2: 2F0 | 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 | 2I7 2W5 | 2W6 2W7
    3: 3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 | 3W5 3W6 3W7

**ZB-V** ("zbv"), the paper's section 6: 2P stages in the V placement of DualPipeV (rank r holds stage r,
"chunk 0", and stage 2P-1-r, "chunk 1"). Rank r runs 2(P-r)-1 forwards of chunk 0, r pairs F1 F0, P-r
triples F1 I1 W1, then a steady state of F0 I0 W0 F1 I1 W1, then r pairs I0 I1, P-r pairs I0 W0, and the
W's still owed (chunk 1 first). With F = I = W per half stage the only bubble is the start-up, P-1
half-stage forwards; peak activations stay at 2P half-stage micro-batches (P full stages). The rule is
written for max(m, 2P-1) micro-batches; for smaller m the actions of the missing micro-batches are
dropped, as torch's `ScheduleZBVZeroBubble` does. The order for P=4, m=8:

    0: 0F0 0F1 0F2 0F3 0F4 0F5 0F6 7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 7I3 7W3 0F7 0I0 0W0 7F4 7I4 7W4 0I1 0W1
           7F5 7I5 7W5 0I2 0W2 7F6 7I6 7W6 0I3 0W3 7F7 7I7 7W7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7
    1: 1F0 1F1 1F2 1F3 1F4 6F0 1F5 6F1 6I0 6W0 6F2 6I1 6W1 6F3 6I2 6W2 1F6 1I0 1W0 6F4 6I3 6W3 1F7 1I1 1W1 6F5 6I4
           6W4 1I2 1W2 6F6 6I5 6W5 1I3 1W3 6F7 6I6 6W6 1I4 6I7 1I5 1W4 1I6 1W5 1I7 1W6 6W7 1W7
    2: 2F0 2F1 2F2 5F0 2F3 5F1 2F4 5F2 5I0 5W0 5F3 5I1 5W1 2F5 2I0 2W0 5F4 5I2 5W2 2F6 2I1 2W1 5F5 5I3 5W3 2F7 2I2
           2W2 5F6 5I4 5W4 2I3 2W3 5F7 5I5 5W5 2I4 5I6 2I5 5I7 2I6 2W4 2I7 2W5 5W6 5W7 2W6 2W7
    3: 3F0 4F0 3F1 4F1 3F2 4F2 3F3 4F3 4I0 4W0 3F4 3I0 3W0 4F4 4I1 4W1 3F5 3I1 3W1 4F5 4I2 4W2 3F6 3I2 3W2 4F6 4I3
           4W3 3F7 3I3 3W3 4F7 4I4 4W4 3I4 4I5 3I5 4I6 3I6 4I7 3I7 3W4 4W5 4W6 4W7 3W5 3W6 3W7
"""

from __future__ import annotations

from .ir import Action, ActionType, Schedule
from .one_f_one_b import check_sizes

__all__ = ["zb1p", "zbv"]


def _zb1p_rank(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    """ZB-H1 order of one rank: 1F1B with I for B, the W of backward i placed right after I(i + rank)."""
    num_warmup = min(num_ranks - rank - 1, num_microbatches)
    order = [Action(rank, ActionType.F, mb) for mb in range(num_warmup)]
    next_w = 0
    for mb in range(num_microbatches):
        forward = mb + num_warmup
        if forward < num_microbatches:
            order.append(Action(rank, ActionType.F, forward))
        order.append(Action(rank, ActionType.I, mb))
        if mb >= rank:  # rank r keeps r W's back; they fill the cool-down bubble at the end
            order.append(Action(rank, ActionType.W, next_w))
            next_w += 1
    order += [Action(rank, ActionType.W, mb) for mb in range(next_w, num_microbatches)]
    return order


def zb1p(num_ranks: int, num_microbatches: int) -> Schedule:
    """The ZB-H1 order for `num_ranks` ranks (one stage each) and `num_microbatches` micro-batches.

    Args:
        num_ranks: pipeline ranks P >= 1.
        num_microbatches: m >= 1.

    Returns:
        A compute-only `Schedule` of kind "zb1p" (I and W actions, no full B).

    Raises:
        ScheduleError: P < 1 or m < 1.
    """
    check_sizes("zb1p", num_ranks, num_microbatches)
    actions = tuple(tuple(_zb1p_rank(num_ranks, num_microbatches, rank)) for rank in range(num_ranks))
    return Schedule(kind="zb1p", num_ranks=num_ranks, num_microbatches=num_microbatches, num_stages=num_ranks,
                    stage_to_rank=tuple(range(num_ranks)), actions=actions)


def _zbv_rank(num_ranks: int, num_microbatches: int, rank: int) -> list[Action]:
    """ZB-V order of one rank for max(m, 2P-1) micro-batches; chunk 0 = stage r, chunk 1 = stage 2P-1-r."""
    num_virtual = max(num_microbatches, 2 * num_ranks - 1)
    stage = (rank, 2 * num_ranks - 1 - rank)
    done = {kind: [0, 0] for kind in (ActionType.F, ActionType.I, ActionType.W)}
    order: list[Action] = []

    def emit(kind: ActionType, chunk: int) -> None:
        order.append(Action(stage[chunk], kind, done[kind][chunk]))
        done[kind][chunk] += 1

    # Warm-up: fill the V down to this rank's chunk 1, then let chunk 1 start its backwards.
    for _ in range(2 * (num_ranks - rank) - 1):
        emit(ActionType.F, 0)
    for _ in range(rank):
        emit(ActionType.F, 1)
        emit(ActionType.F, 0)
    for _ in range(num_ranks - rank):
        for kind in (ActionType.F, ActionType.I, ActionType.W):
            emit(kind, 1)
    # Steady state: one F, I, W per chunk per round.
    forwards = done[ActionType.F]
    while forwards[1] < forwards[0] or forwards[0] < num_virtual:
        if forwards[0] < num_virtual:
            emit(ActionType.F, 0)
        for chunk, kinds in ((0, "IW"), (1, "FIW")):
            for kind in kinds:
                emit(ActionType(kind), chunk)
    # Cool-down: the I's of both chunks first, with chunk 0's W's filling the gaps, then the W's still owed.
    for _ in range(rank):
        emit(ActionType.I, 0)
        emit(ActionType.I, 1)
    for _ in range(num_ranks - rank):
        emit(ActionType.I, 0)
        emit(ActionType.W, 0)
    for chunk in (1, 0):
        while done[ActionType.W][chunk] < done[ActionType.I][chunk]:
            emit(ActionType.W, chunk)
    return [action for action in order if action.microbatch < num_microbatches]


def zbv(num_ranks: int, num_microbatches: int) -> Schedule:
    """The ZB-V order for `num_ranks` ranks (2P stages, V placement) and `num_microbatches` micro-batches.

    Args:
        num_ranks: pipeline ranks P >= 1; rank r holds stages r and 2P-1-r.
        num_microbatches: m >= 1 (the bubble-free steady state needs m >= 2P-1).

    Returns:
        A compute-only `Schedule` of kind "zbv" (I and W actions, no full B).

    Raises:
        ScheduleError: P < 1 or m < 1.
    """
    check_sizes("zbv", num_ranks, num_microbatches)
    num_stages = 2 * num_ranks
    actions = tuple(tuple(_zbv_rank(num_ranks, num_microbatches, rank)) for rank in range(num_ranks))
    stage_to_rank = tuple(s if s < num_ranks else num_stages - 1 - s for s in range(num_stages))
    return Schedule(kind="zbv", num_ranks=num_ranks, num_microbatches=num_microbatches, num_stages=num_stages,
                    stage_to_rank=stage_to_rank, actions=actions)
