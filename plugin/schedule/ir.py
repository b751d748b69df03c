"""The schedule IR: per pipeline rank, an ordered tuple of actions on (stage, micro-batch).

Text form (round-trips through `Action.parse`):

    "3F1"          forward of stage 3, micro-batch 1
    "3B1"          full backward (input and weight grads)
    "3I1" / "3W1"  input-grad only / deferred weight-grad of that backward
    "0F5&3B1"      an overlapped pair: forward 0F5 and backward 3B1 run together (DualPipe's F&B)
    "1SEND_F2"     send the activations stage 1 produced for micro-batch 2 to the next stage's rank
    "2RECV_F2"     receive the activations stage 2 needs for micro-batch 2
    "1SEND_B2"     send the input grads of stage 1, micro-batch 2 to the previous stage's rank
    "0RECV_B2"     receive the output grads stage 0 needs for micro-batch 2

Stages are global indices 0..num_stages-1 of one schedule. A micro-batch walks a *path* of stages:
0..S-1 for every schedule but DualPipe, whose two model copies are stages 0..P-1 (copy 0) and
P..2P-1 (copy 1); the first half of the micro-batches walks copy 0, the second half copy 1. Stage s
computes model part `s % stages_per_copy`. A bubble is a missing action, never a placeholder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from ..errors import ScheduleError

__all__ = ["COMM_TYPES", "COMPUTE_TYPES", "Action", "ActionType", "Schedule"]


class ActionType(str, Enum):
    """What an action does; the value is the text used in `Action`'s string form."""

    F = "F"
    B = "B"
    I = "I"  # noqa: E741 - the letter the literature uses for input-grad backward
    W = "W"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMPUTE_TYPES = frozenset({ActionType.F, ActionType.B, ActionType.I, ActionType.W, ActionType.FB})
COMM_TYPES = frozenset({ActionType.SEND_F, ActionType.RECV_F, ActionType.SEND_B, ActionType.RECV_B})

_SIMPLE_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclass(frozen=True, slots=True)
class Action:
    """One scheduled action; for `FB`, `pair` holds (forward, backward) and stage/microbatch mirror the forward."""

    stage: int
    type: ActionType
    microbatch: int
    pair: tuple[Action, Action] | tuple[()] = field(default=(), compare=True)

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self.type.value}: stage ({self.stage}) and micro-batch "
                                f"({self.microbatch}) must be >= 0")
        if self.type is ActionType.FB:
            if len(self.pair) != 2:
                raise ScheduleError("an FB action needs pair=(forward, backward)")
            fwd, bwd = self.pair
            if fwd.type is not ActionType.F or bwd.type not in (ActionType.B, ActionType.I):
                raise ScheduleError(f"FB pair must be (F, B|I), got ({fwd.type.value}, {bwd.type.value})")
            if (fwd.stage, fwd.microbatch) != (self.stage, self.microbatch):
                raise ScheduleError("FB action's stage/microbatch must equal its forward's")
        elif self.pair:
            raise ScheduleError(f"only FB actions carry a pair, not {self.type.value}")

    @classmethod
    def overlap(cls, forward: Action, backward: Action) -> Action:
        """The overlapped pair F&B of `forward` and `backward`."""
        return cls(forward.stage, ActionType.FB, forward.microbatch, (forward, backward))

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read an action back from its string form (inverse of `str`)."""
        text = text.strip()
        if "&" in text:
            left, right = text.split("&", 1)
            return cls.overlap(cls.parse(left), cls.parse(right))
        match = _SIMPLE_RE.match(text)
        if not match:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '3F1', '0F5&3B1', '1SEND_F2'")
        return cls(int(match.group(1)), ActionType(match.group(2)), int(match.group(3)))

    @property
    def is_compute(self) -> bool:
        """True for F, B, I, W and FB."""
        return self.type in COMPUTE_TYPES

    def computations(self) -> tuple[Action, ...]:
        """The plain compute actions this action performs (the pair for FB, itself otherwise)."""
        if self.type is ActionType.FB:
            return self.pair  # type: ignore[return-value]
        return (self,) if self.is_compute else ()

    def __str__(self) -> str:
        if self.type is ActionType.FB:
            return f"{self.pair[0]}&{self.pair[1]}"
        return f"{self.stage}{self.type.value}{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    """Per-rank action lists plus the facts needed to execute and check them."""

    kind: str
    num_ranks: int
    num_microbatches: int
    num_stages: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    num_copies: int = 1

    def __post_init__(self) -> None:
        if len(self.stage_to_rank) != self.num_stages:
            raise ScheduleError(f"stage_to_rank has {len(self.stage_to_rank)} entries, "
                                f"num_stages is {self.num_stages}")
        if len(self.actions) != self.num_ranks:
            raise ScheduleError(f"actions has {len(self.actions)} ranks, num_ranks is {self.num_ranks}")
        if self.num_copies not in (1, 2) or self.num_stages % self.num_copies:
            raise ScheduleError(f"num_copies={self.num_copies} must be 1 or 2 and divide num_stages")
        for rank, rank_actions in enumerate(self.actions):
            for step, action in enumerate(rank_actions):
                for part in (action, *action.pair):
                    if part.stage >= self.num_stages or self.stage_to_rank[part.stage] != rank:
                        raise ScheduleError(f"rank {rank}, step {step}: action {action} touches stage "
                                            f"{part.stage}, which is not on rank {rank}")
                    if part.microbatch >= self.num_microbatches:
                        raise ScheduleError(f"rank {rank}, step {step}: action {action} names micro-batch "
                                            f">= num_microbatches ({self.num_microbatches})")

    @property
    def stages_per_copy(self) -> int:
        """Number of model parts (a DualPipe schedule holds two copies of each)."""
        return self.num_stages // self.num_copies

    def copy_of(self, microbatch: int) -> int:
        """Which model copy a micro-batch walks (always 0 unless DualPipe)."""
        return microbatch * self.num_copies // self.num_microbatches

    def path(self, microbatch: int) -> tuple[int, ...]:
        """Stages a micro-batch's forward visits, in order."""
        first = self.copy_of(microbatch) * self.stages_per_copy
        return tuple(range(first, first + self.stages_per_copy))

    def model_part(self, stage: int) -> int:
        """Index of the model part (layer block) stage `stage` computes."""
        return stage % self.stages_per_copy

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stages placed on `rank`, ascending."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def next_stage(self, stage: int) -> int | None:
        """Stage that consumes `stage`'s forward output, or None for a path's last stage."""
        nxt = stage + 1
        return None if nxt % self.stages_per_copy == 0 else nxt

    def prev_stage(self, stage: int) -> int | None:
        """Stage whose forward output `stage` consumes, or None for a path's first stage."""
        return None if stage % self.stages_per_copy == 0 else stage - 1

    def is_first(self, stage: int) -> bool:
        """True where a path starts (the stage that loads inputs)."""
        return self.prev_stage(stage) is None

    def is_last(self, stage: int) -> bool:
        """True where a path ends (the stage that computes the loss)."""
        return self.next_stage(stage) is None

    def to_text(self) -> str:
        """One line per rank: `rank: a1 a2 ...`; a golden-file friendly form."""
        return "\n".join(f"{rank}: " + " ".join(map(str, acts)) for rank, acts in enumerate(self.actions))

    def with_actions(self, actions: tuple[tuple[Action, ...], ...]) -> Schedule:
        """The same schedule with other per-rank actions (used by lowering passes)."""
        return Schedule(kind=self.kind, num_ranks=self.num_ranks, num_microbatches=self.num_microbatches,
                        num_stages=self.num_stages, stage_to_rank=self.stage_to_rank, actions=actions,
                        num_copies=self.num_copies)
