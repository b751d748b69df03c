"""1F1B: DeepSpeed's `TrainSchedule` order, the baseline every other schedule is compared with.

Rank r holds stage r. It runs min(P-r-1, m) warm-up forwards, then alternates one forward and one full
backward while forwards remain, then drains the backwards. At most min(P-r, m) micro-batches are in flight
on rank r. The order for P=4, m=8:

    0: 0F0 0F1 0F2 | 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 | 0B5 0B6 0B7
    1: 1F0 1F1 | 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1F6 1B4 1F7 1B5 | 1B6 1B7
    2: 2F0 | 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 | 2B7
    3: 3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7

DeepSpeed expresses the same order as 2(m+P-1) lock-step slots (deepspeed/runtime/pipe/schedule.py,
`TrainSchedule`); tests/golden/1f1b_*.txt hold traces of that class.
"""

from __future__ import annotations

from ..errors import ScheduleError
from .ir import Action, ActionType, Schedule

__all__ = ["check_sizes", "one_f_one_b"]


def check_sizes(kind: str, num_ranks: int, num_microbatches: int) -> None:
    """Raise ScheduleError unless P >= 1 and m >= 1 (the constraints of the one-stage-per-rank schedules)."""
    if num_ranks < 1:
        raise ScheduleError(f"{kind}: num_ranks={num_ranks} must be >= 1")
    if num_microbatches < 1:
        raise ScheduleError(f"{kind}: num_microbatches={num_microbatches} must be >= 1")


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """The 1F1B order for `num_ranks` ranks (one stage each) and `num_microbatches` micro-batches.

    Args:
        num_ranks: pipeline ranks P >= 1.
        num_microbatches: m >= 1 (m < P leaves ranks idle but is valid, as in DeepSpeed).

    Returns:
        A compute-only `Schedule` of kind "1f1b".

    Raises:
        ScheduleError: P < 1 or m < 1.
    """
    check_sizes("1f1b", num_ranks, num_microbatches)
    actions = []
    for rank in range(num_ranks):
        num_warmup = min(num_ranks - rank - 1, num_microbatches)
        order = [Action(rank, ActionType.F, mb) for mb in range(num_warmup)]
        for mb in range(num_warmup, num_microbatches):
            order += [Action(rank, ActionType.F, mb), Action(rank, ActionType.B, mb - num_warmup)]
        order += [Action(rank, ActionType.B, mb) for mb in range(num_microbatches - num_warmup, num_microbatches)]
        actions.append(tuple(order))
    return Schedule(kind="1f1b", num_ranks=num_ranks, num_microbatches=num_microbatches, num_stages=num_ranks,
                    stage_to_rank=tuple(range(num_ranks)), actions=tuple(actions))
