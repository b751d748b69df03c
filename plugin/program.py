"""The per-rank instruction lists the engine executes: generated, (forward-only,) lowered, checked once.

    schedule = generate(kind, P, m)             compute-only, every rank (pure)
    insert_p2p(schedule)                        SEND/RECV wherever producer and consumer ranks differ
    forward_only(lowered)                       eval: F and SEND_F/RECV_F only (an FB pair keeps its F)
    RankProgram(actions=lowered.actions[r])     what rank r runs, in order
    split_serial_pairs(actions, serial)         an F&B pair that runs serially becomes F, its SEND_F, B

Forward-only programs are cut from the lowered training schedule: dropping actions keeps the per-pair
message order and only removes waits, so the result is as deadlock-free as the training schedule.

All schedule arithmetic lives in `dualmoe.schedule`; the engine only walks `RankProgram.actions`.
Programs are cached per (train, m), since a step's program depends on nothing else.

`message_links(schedule)` lists the (sender, receiver) rank pairs of every message of all ranks: the p2p
connections the engine sets up before the first step (`PipeComm.warm_up`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .schedule import generate
from .schedule.ir import Action, ActionType, Schedule
from .schedule.lowering import insert_p2p

__all__ = ["RankProgram", "build_program", "forward_only", "message_links", "split_serial_pairs"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RankProgram:
    """The lowered actions of one pipeline rank for one step.

    Args:
        schedule: the lowered schedule of all ranks (for queries: paths, stage placement).
        pp_rank: the rank this program is for.
        train: True for a training step (backward, W, optimizer step), False for forward only.
    """

    schedule: Schedule
    pp_rank: int
    train: bool

    @property
    def actions(self) -> tuple[Action, ...]:
        """This rank's actions in execution order."""
        return self.schedule.actions[self.pp_rank]

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step."""
        return self.schedule.num_microbatches

    def loads_data(self) -> bool:
        """True where this rank holds the first or last stage of some micro-batch's path."""
        s = self.schedule
        return any(s.is_first(stage) or s.is_last(stage) for stage in s.stages_of(self.pp_rank))

    def input_source(self, stage: int) -> Literal["data", "local", "recv"]:
        """Where a forward of `stage` gets its inputs: the data, the previous stage on this rank, a message."""
        prev = self.schedule.prev_stage(stage)
        if prev is None:
            return "data"
        return "local" if self.schedule.stage_to_rank[prev] == self.pp_rank else "recv"

    def grad_source(self, stage: int) -> Literal["loss", "local", "recv"]:
        """Where a backward of `stage` gets its output grads: its loss, the next stage here, a message."""
        nxt = self.schedule.next_stage(stage)
        if nxt is None:
            return "loss"
        return "local" if self.schedule.stage_to_rank[nxt] == self.pp_rank else "recv"

    def next_rank(self, stage: int) -> int:
        """Pipeline rank of the stage after `stage` (which must exist)."""
        return self.schedule.stage_to_rank[self.schedule.next_stage(stage)]  # type: ignore[index]

    def prev_rank(self, stage: int) -> int:
        """Pipeline rank of the stage before `stage` (which must exist)."""
        return self.schedule.stage_to_rank[self.schedule.prev_stage(stage)]  # type: ignore[index]

    def loss_ranks(self) -> tuple[int, ...]:
        """Pipeline ranks computing a loss (the last stage of some path), ascending."""
        s = self.schedule
        return tuple(sorted({s.stage_to_rank[s.path(mb)[-1]] for mb in range(s.num_microbatches)}))


_FORWARD_COMM = (ActionType.SEND_F, ActionType.RECV_F)


def forward_only(schedule: Schedule) -> Schedule:
    """Keep each rank's forwards and their messages in order, drop every backward (an F&B pair keeps its F)."""
    actions = []
    for rank_actions in schedule.actions:
        kept: list[Action] = []
        for action in rank_actions:
            if action.type in _FORWARD_COMM:
                kept.append(action)
            else:
                kept += [c for c in action.computations() if c.type is ActionType.F]
        actions.append(tuple(kept))
    return schedule.with_actions(tuple(actions))


def message_links(schedule: Schedule) -> tuple[tuple[int, int], ...]:
    """Sorted (sending rank, receiving rank) pairs of every SEND in a lowered schedule, over all ranks."""
    links = set()
    for rank, rank_actions in enumerate(schedule.actions):
        for action in rank_actions:
            if action.type is ActionType.SEND_F:
                links.add((rank, schedule.stage_to_rank[schedule.next_stage(action.stage)]))
            elif action.type is ActionType.SEND_B:
                links.add((rank, schedule.stage_to_rank[schedule.prev_stage(action.stage)]))
    return tuple(sorted(links))


def split_serial_pairs(actions: tuple[Action, ...], serial: Callable[[Action], bool]) -> tuple[Action, ...]:
    """Run each F&B pair for which `serial(pair)` holds as F, then F's SEND_F, then B (or I).

    A serial pair computes F then B anyway; as one action its forward output would only be sent after
    the backward too, and the peer waiting for it would idle meanwhile. Lowering puts a pair's SEND_F
    right after the pair (before its SEND_B), so moving it between F and B keeps the order of the
    messages to every peer, and the numbers are those of the pair (F, then B, nothing in between).
    """
    out: list[Action] = []
    index = 0
    while index < len(actions):
        action = actions[index]
        index += 1
        if action.type is not ActionType.FB or not serial(action):
            out.append(action)
            continue
        forward, backward = action.pair
        out.append(forward)
        send = Action(forward.stage, ActionType.SEND_F, forward.microbatch)
        if index < len(actions) and actions[index] == send:
            out.append(send)
            index += 1
        out.append(backward)
    return tuple(out)


def build_program(kind: str, num_ranks: int, num_microbatches: int, pp_rank: int, *, train: bool) -> RankProgram:
    """Generate, lower and slice the schedule for one rank.

    Args:
        kind: schedule name ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev").
        num_ranks: pipeline ranks P.
        num_microbatches: micro-batches m.
        pp_rank: the rank to run.
        train: False for a forward-only (evaluation) program.

    Raises:
        ScheduleError: the generator rejects (P, m), or the lowered schedule is inconsistent.
    """
    lowered = insert_p2p(generate(kind, num_ranks, num_microbatches))
    return RankProgram(schedule=lowered if train else forward_only(lowered), pp_rank=pp_rank, train=train)
