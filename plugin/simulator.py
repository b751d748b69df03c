"""Discrete-event simulator of a pipeline schedule: per-action costs in, timeline out.

Every rank runs its action list in order, one compute action at a time; an action starts when the
rank is free and its dependencies have ended:

    F(s, mb)    after F(prev(s), mb)                    (nothing for a path's first stage)
    B/I(s, mb)  after F(s, mb) and B/I(next(s), mb)     (the loss stage needs only its own F)
    W(s, mb)    after I(s, mb)
    F&B         when both parts' dependencies are met; it lasts `CostModel.forward_backward`

A dependency on another rank arrives `p2p_latency` later. A *lowered* schedule (one with SEND/RECV
actions) routes every cross-rank dependency through them instead: SEND costs nothing on the compute
stream and happens when the rank reaches it; RECV is non-blocking: it is posted when the rank reaches
it and completes at max(post, matching SEND + latency); the compute that needs the data waits for that.
Messages between two ranks must be posted in the same order on both sides (NCCL matches p2p per
pair in order); `simulate` checks that first.

Activation memory is counted per rank in units of one stage's activations for one micro-batch
(half a device-stage for V schedules): +1 when a stage's F starts (an F&B pair's forward included),
-1 when that micro-batch's backward on that stage has fully ended: at the end of B, or of W when the
backward is split into I and W. Frees at a time come before allocations at the same time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

from .errors import ConfigError, ScheduleError
from .schedule import check_p2p_order
from .schedule.ir import COMM_TYPES, Action, ActionType, Schedule
from .tracing import COMPUTE_STREAM, TraceEvent, action_event_name

__all__ = ["CostModel", "Timeline", "simulate"]

# Short names used on the command line and in `CostModel.parse`, mapped to field names.
_COST_KEYS = {"F": "forward", "B": "backward", "W": "weight_grad", "FB": "overlap", "P2P": "p2p_latency"}


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    """Time of each action for one stage and one micro-batch, in any unit (traces read it as µs).

    Args:
        forward: F, one forward.
        backward: B, one full backward (input grads and weight grads).
        weight_grad: W, the weight-grad part of B; an input-grad-only backward I costs B - W.
        overlap: F&B, an overlapped forward of one micro-batch and backward of another; None means F + B
            (no overlap benefit). A pair whose backward is an I lasts F&B - W (at least max(F, I)).
        p2p_latency: added to every dependency that crosses ranks.
    """

    forward: float
    backward: float
    weight_grad: float = 0.0
    overlap: float | None = None
    p2p_latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "weight_grad", "overlap", "p2p_latency"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"CostModel.{name}={value!r} must be a finite number >= 0")
        if self.forward <= 0 or self.backward <= 0:
            raise ConfigError(f"F={self.forward:g} and B={self.backward:g} must both be > 0")
        if self.weight_grad >= self.backward:
            raise ConfigError(f"W={self.weight_grad:g} must be < B={self.backward:g} (W is the weight-grad part of "
                              "the full backward B; I = B - W)")
        if self.overlap is not None and self.overlap < max(self.forward, self.backward) * (1 - 1e-9):
            raise ConfigError(f"FB={self.overlap:g} must be >= max(F, B) = {max(self.forward, self.backward):g} "
                              "(an overlapped F&B pair cannot beat its longer part)")

    @property
    def input_grad(self) -> float:
        """I = B - W, the input-grad-only backward."""
        return self.backward - self.weight_grad

    @property
    def forward_backward(self) -> float:
        """F&B: `overlap` if given, else F + B."""
        return self.forward + self.backward if self.overlap is None else self.overlap

    def duration(self, action: Action) -> float:
        """Compute-stream time of `action` (0 for SEND/RECV)."""
        kind = action.type
        if kind is ActionType.FB:
            if action.pair[1].type is ActionType.B:
                return self.forward_backward
            return max(self.forward_backward - self.weight_grad, self.forward, self.input_grad)
        return {ActionType.F: self.forward, ActionType.B: self.backward, ActionType.I: self.input_grad,
                ActionType.W: self.weight_grad}.get(kind, 0.0)

    def scaled(self, factor: float) -> CostModel:
        """Every compute cost times `factor` (latency unchanged); e.g. 0.5 for the half stages of a V."""
        return CostModel(forward=self.forward * factor, backward=self.backward * factor,
                         weight_grad=self.weight_grad * factor,
                         overlap=None if self.overlap is None else self.overlap * factor,
                         p2p_latency=self.p2p_latency)

    @classmethod
    def parse(cls, text: str) -> CostModel:
        """Read "F=1,B=2,W=1,FB=3[,P2P=0.1]" (keys: F, B, W, FB, P2P; F and B required).

        Raises:
            ConfigError: unknown or repeated key, a value that is not a number, or invalid costs.
        """
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().upper()
            if not sep or key not in _COST_KEYS:
                raise ConfigError(f"cost item {item!r}: expected KEY=NUMBER with KEY one of {', '.join(_COST_KEYS)}")
            if _COST_KEYS[key] in values:
                raise ConfigError(f"cost key {key} given twice")
            try:
                values[_COST_KEYS[key]] = float(raw)
            except ValueError:
                raise ConfigError(f"cost {key}={raw.strip()!r} is not a number") from None
        missing = [k for k in ("F", "B") if _COST_KEYS[k] not in values]
        if missing:
            raise ConfigError(f"costs {text!r} lack {' and '.join(missing)} (F and B are required)")
        return cls(**values)

    def __str__(self) -> str:
        text = f"F={self.forward:g},B={self.backward:g},W={self.weight_grad:g},FB={self.forward_backward:g}"
        return text + (f",P2P={self.p2p_latency:g}" if self.p2p_latency else "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    """What `simulate` predicts for one step.

    Args:
        schedule: the simulated schedule.
        costs: the per-stage costs used.
        events: compute events (stream "compute", one per action, F&B pairs as one event) and, for
            lowered schedules, p2p events (streams "send"/"recv", wire time only); sorted by rank, start.
        makespan: end of the last compute action (the step starts at 0).
        busy_per_rank: compute-stream busy time per rank (an F&B pair counts F&B).
        idle_per_rank: makespan - busy, per rank.
        peak_activations_per_rank: most stage micro-batch activations alive at once (module docstring).
        bubble: max(idle_per_rank), the idle time of the worst rank. This is what the DualPipe README's
            bubble column measures; with F&B = F + B every rank idles the same. (makespan - m(F+B) is no
            measure once F&B < F + B: the overlap saves compute, and ranks overlap different numbers of pairs.)
    """

    schedule: Schedule
    costs: CostModel
    events: tuple[TraceEvent, ...]
    makespan: float
    busy_per_rank: tuple[float, ...]
    idle_per_rank: tuple[float, ...]
    peak_activations_per_rank: tuple[int, ...]
    bubble: float

    def compute_events(self, rank: int) -> tuple[TraceEvent, ...]:
        """Compute-stream events of `rank`, in time order."""
        return tuple(e for e in self.events if e.rank == rank and e.stream == COMPUTE_STREAM)

    @property
    def bubble_fraction(self) -> float:
        """bubble / makespan."""
        return self.bubble / self.makespan


def simulate(schedule: Schedule, costs: CostModel) -> Timeline:
    """Run `schedule` (compute-only or lowered with SEND/RECV) under `costs`.

    Returns:
        The Timeline: events, makespan, idle time and peak activations per rank.

    Raises:
        ScheduleError: the schedule cannot finish (names each stuck rank, its next action and the missing
            dependency), runs an action twice, leaves a (stage, micro-batch) without F or backward, or
            posts SENDs and RECVs between two ranks in different orders.
    """
    lowered = any(a.type in COMM_TYPES for acts in schedule.actions for a in acts)
    if lowered:
        check_p2p_order(schedule)  # one source of truth for the per-pair order rule, shared with the engine
    result = _Run(schedule, costs, lowered=lowered)
    result.run()
    makespan = max((end for _, _, _, end in result.records), default=0.0)
    busy = [0.0] * schedule.num_ranks
    for rank, _, start, end in result.records:
        busy[rank] += end - start
    return Timeline(
        schedule=schedule, costs=costs,
        events=tuple(sorted(result.events, key=lambda e: (e.rank, e.start_us, e.stream))),
        makespan=makespan, busy_per_rank=tuple(busy), idle_per_rank=tuple(makespan - b for b in busy),
        peak_activations_per_rank=_peak_activations(schedule.num_ranks, result.records),
        bubble=max((makespan - b for b in busy), default=0.0),
    )


def _peak_activations(num_ranks: int, records: list[tuple[int, Action, float, float]]) -> tuple[int, ...]:
    """+1 at each forward's start, -1 at the end of the B or W that completes its backward."""
    deltas: list[list[tuple[float, int]]] = [[] for _ in range(num_ranks)]
    for rank, action, start, end in records:
        for part in action.computations():
            if part.type is ActionType.F:
                deltas[rank].append((start, +1))
            elif part.type in (ActionType.B, ActionType.W):
                deltas[rank].append((end, -1))
    # Sorting (time, delta) puts -1 before +1 at equal times: free, then allocate.
    return tuple(max(accumulate((d for _, d in sorted(rank_deltas)), initial=0)) for rank_deltas in deltas)


# A dependency key: (tag, stage, micro-batch). Tags: "F" forward ended, "X" input grads ready (B, I or the
# backward of a pair ended), "I" an I ended, "D" the backward fully ended (B or W), "SF"/"SB" a SEND
# happened, "RF"/"RB" a RECV completed (posted and its SEND arrived).
_Key = tuple[str, int, int]
_RECV_TAG = {ActionType.RECV_F: "RF", ActionType.RECV_B: "RB"}
_SEND_TAG = {ActionType.SEND_F: "SF", ActionType.SEND_B: "SB"}
_PRODUCES = {ActionType.F: ("F",), ActionType.B: ("X", "D"), ActionType.I: ("X", "I"), ActionType.W: ("D",),
             ActionType.SEND_F: ("SF",), ActionType.SEND_B: ("SB",)}
_KEY_TEXT = {"F": "{s}F{m}", "X": "{s}B{m} (or {s}I{m})", "I": "{s}I{m}", "D": "{s}B{m} (or {s}W{m})",
             "SF": "{s}SEND_F{m}", "SB": "{s}SEND_B{m}", "RF": "{s}RECV_F{m}", "RB": "{s}RECV_B{m}"}


class _Run:
    """The event loop: advance every rank as far as its dependencies allow until all ranks are done."""

    def __init__(self, schedule: Schedule, costs: CostModel, *, lowered: bool) -> None:
        self.schedule, self.costs, self.lowered = schedule, costs, lowered
        self.done: dict[_Key, float] = {}
        self.done_at: dict[_Key, tuple[int, int]] = {}  # where each key was produced: (rank, step)
        self.posted: dict[_Key, float] = {}  # RECV keys -> post time
        self.clock = [0.0] * schedule.num_ranks
        self.step = [0] * schedule.num_ranks
        self.records: list[tuple[int, Action, float, float]] = []  # (rank, compute action, start, end)
        self.events: list[TraceEvent] = []  # compute and p2p events for the trace

    def run(self) -> None:
        acts = self.schedule.actions
        progress = True
        while progress:
            progress = False
            for rank in range(self.schedule.num_ranks):
                while self.step[rank] < len(acts[rank]) and self._try(rank, acts[rank][self.step[rank]]):
                    self.step[rank] += 1
                    progress = True
        if any(self.step[r] < len(acts[r]) for r in range(self.schedule.num_ranks)):
            raise self._stuck_error()
        self._check_complete()
        self._add_recv_events()

    def _deps(self, rank: int, part: Action) -> list[tuple[_Key, float]]:
        stage, mb, kind = part.stage, part.microbatch, part.type
        if kind is ActionType.F:
            prev = self.schedule.prev_stage(stage)
            return [] if prev is None else [self._link(rank, "F", prev, stage, mb, "RF")]
        if kind in (ActionType.B, ActionType.I):
            nxt = self.schedule.next_stage(stage)
            deps = [(("F", stage, mb), 0.0)]
            return deps if nxt is None else [*deps, self._link(rank, "X", nxt, stage, mb, "RB")]
        if kind is ActionType.W:
            return [(("I", stage, mb), 0.0)]
        if kind in _SEND_TAG:
            return [(("F" if kind is ActionType.SEND_F else "X", stage, mb), 0.0)]
        return []  # a RECV is posted at once

    def _link(self, rank: int, tag: str, src_stage: int, stage: int, mb: int, recv_tag: str) -> tuple[_Key, float]:
        """Dependency on `tag` of (src_stage, mb): direct on one rank, else by latency or through a RECV."""
        if self.schedule.stage_to_rank[src_stage] == rank:
            return (tag, src_stage, mb), 0.0
        if self.lowered:
            return (recv_tag, stage, mb), 0.0
        return (tag, src_stage, mb), self.costs.p2p_latency

    def _send_key(self, recv_key: _Key) -> _Key:
        tag, stage, mb = recv_key
        src = self.schedule.prev_stage(stage) if tag == "RF" else self.schedule.next_stage(stage)
        assert src is not None  # check_p2p_order rejected RECVs from beyond a path
        return ("SF" if tag == "RF" else "SB", src, mb)

    def _time(self, key: _Key) -> float | None:
        if key[0] not in ("RF", "RB"):
            return self.done.get(key)
        send_key = self._send_key(key)
        if key not in self.posted or send_key not in self.done:
            return None
        cross = self.done_at[send_key][0] != self.schedule.stage_to_rank[key[1]]
        return max(self.posted[key], self.done[send_key] + (self.costs.p2p_latency if cross else 0.0))

    def _try(self, rank: int, action: Action) -> bool:
        """Run `action` on `rank` if its dependencies have happened; False if it must wait."""
        ready = self.clock[rank]
        for part in action.computations() or (action,):
            for key, latency in self._deps(rank, part):
                when = self._time(key)
                if when is None:
                    return False
                ready = max(ready, when + latency)
        if action.type in _RECV_TAG:
            key = (_RECV_TAG[action.type], action.stage, action.microbatch)
            self._produce(key, self.clock[rank], rank, store=False)
            return True
        if action.type in _SEND_TAG:
            self._produce((_SEND_TAG[action.type], action.stage, action.microbatch), ready, rank)
            self.events.append(TraceEvent(rank=rank, stream="send", name=action_event_name(action), start_us=ready,
                                          dur_us=self.costs.p2p_latency, args={"action": str(action)}))
            return True
        end = ready + self.costs.duration(action)
        for part in action.computations():
            for tag in _PRODUCES[part.type]:
                self._produce((tag, part.stage, part.microbatch), end, rank)
        self.records.append((rank, action, ready, end))
        self.events.append(_compute_event(rank, action, ready, end))
        self.clock[rank] = end
        return True

    def _produce(self, key: _Key, when: float, rank: int, *, store: bool = True) -> None:
        book = self.done if store else self.posted
        if key in book:
            first_rank, first_step = self.done_at[key]
            raise ScheduleError(f"rank {rank}, step {self.step[rank]}: {_key_text(key)} runs twice "
                                f"(first on rank {first_rank}, step {first_step})")
        book[key] = when
        self.done_at[key] = (rank, self.step[rank])

    def _check_complete(self) -> None:
        schedule = self.schedule
        problems = [f"{_key_text((tag, s, mb))} never runs" for mb in range(schedule.num_microbatches)
                    for s in schedule.path(mb) for tag in ("F", "D") if (tag, s, mb) not in self.done]
        problems += [f"{_key_text(k)} is off micro-batch {k[2]}'s path" for k in self.done
                     if k[0] == "F" and k[1] not in schedule.path(k[2])]
        if problems:
            raise ScheduleError(f"schedule {schedule.kind} (P={schedule.num_ranks}, m={schedule.num_microbatches}) "
                                f"is incomplete: {'; '.join(problems[:6])}")

    def _add_recv_events(self) -> None:
        for key, post in self.posted.items():
            done = self._time(key)
            assert done is not None  # every RECV has its SEND (check_p2p_order) and every SEND ran
            arrive = max(post, self.done[self._send_key(key)])
            stage, mb = key[1], key[2]
            name = f"dualmoe/{'RECV_F' if key[0] == 'RF' else 'RECV_B'}/s{stage}/mb{mb}"
            self.events.append(TraceEvent(rank=self.schedule.stage_to_rank[stage], stream="recv", name=name,
                                          start_us=arrive, dur_us=done - arrive, args={"action": _key_text(key)}))

    def _stuck_error(self) -> ScheduleError:
        producers: dict[_Key, tuple[int, int]] = {}
        for rank, acts in enumerate(self.schedule.actions):
            for step, action in enumerate(acts):
                for key in _keys_of(action):
                    producers.setdefault(key, (rank, step))
        lines = []
        for rank, acts in enumerate(self.schedule.actions):
            if self.step[rank] < len(acts):
                action = acts[self.step[rank]]
                lines.append(f"rank {rank} at step {self.step[rank]} ({action}) waits for "
                             + self._describe_missing(rank, action, producers))
        schedule = self.schedule
        return ScheduleError(f"schedule {schedule.kind} (P={schedule.num_ranks}, m={schedule.num_microbatches}) "
                             "cannot finish: " + "; ".join(lines))

    def _describe_missing(self, rank: int, action: Action, producers: dict[_Key, tuple[int, int]]) -> str:
        for part in action.computations() or (action,):
            for key, _ in self._deps(rank, part):
                if self._time(key) is not None:
                    continue
                if key[0] in ("RF", "RB") and key in self.posted:
                    key = self._send_key(key)  # posted, but the matching SEND never happened
                where = producers.get(key)
                if where is None:
                    return f"{_key_text(key)}, which no rank's list contains"
                src_rank, src_step = where
                if src_rank == rank:
                    return f"{_key_text(key)}, which comes later on rank {rank} (step {src_step})"
                blocked = self.schedule.actions[src_rank][self.step[src_rank]]
                return (f"{_key_text(key)} (rank {src_rank}, step {src_step}; rank {src_rank} is stuck at step "
                        f"{self.step[src_rank]} on {blocked})")
        raise AssertionError(f"rank {rank}: {action} is not blocked")


def _compute_event(rank: int, action: Action, start: float, end: float) -> TraceEvent:
    args: dict[str, str | int | float] = {"action": str(action), "type": action.type.value, "stage": action.stage,
                                          "microbatch": action.microbatch}
    if action.type is ActionType.FB:
        args["forward"], args["backward"] = str(action.pair[0]), str(action.pair[1])
    return TraceEvent(rank=rank, stream=COMPUTE_STREAM, name=action_event_name(action), start_us=start,
                      dur_us=end - start, args=args)


def _keys_of(action: Action) -> list[_Key]:
    """Dependency keys an action produces once run."""
    if action.type in _RECV_TAG:
        return [(_RECV_TAG[action.type], action.stage, action.microbatch)]
    return [(tag, part.stage, part.microbatch) for part in action.computations() or (action,)
            for tag in _PRODUCES[part.type]]


def _key_text(key: _Key) -> str:
    tag, stage, mb = key
    return _KEY_TEXT[tag].format(s=stage, m=mb)
