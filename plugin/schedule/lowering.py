"""Lowering passes and checks over the schedule IR; each pass is `Schedule -> Schedule` and tested alone.

- `validate(schedule)`: every micro-batch gets exactly one F and one full backward (B, or I then W) on each
  stage of its path; dependencies hold in each rank's order; the ranks together cannot wait on each other
  in a cycle.
- `insert_p2p(schedule)`: adds SEND_F/RECV_F/SEND_B/RECV_B wherever a producer and its consumer stage sit on
  different ranks (the V turn-around on rank P-1 stays local). A SEND follows its producing compute; a
  RECV precedes its consumer. NCCL and gloo match p2p messages between two ranks in posting order, so for
  every ordered rank pair (a -> b) the RECVs on b come in exactly the order of the SENDs on a; where a later
  message is consumed first, the RECVs of the earlier ones move up with it (the engine posts RECVs ahead).
- `check_p2p_order(schedule)`: proves a lowered schedule deadlock-free under the engine's rules: a SEND or
  RECV never blocks, a RECV completes once its matching SEND is issued, a compute blocks until the RECVs
  it consumes have completed.
- `split_backward(schedule)`: turns full backwards B into I immediately followed by W.

Example, 1F1B with P=2, m=2, lowered:

    0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1
    1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

from ..errors import ScheduleError
from .ir import Action, ActionType, Schedule

__all__ = ["check_p2p_order", "insert_p2p", "split_backward", "validate"]

T = ActionType
# A data item a computation produces or needs: ("F", stage, mb) = stage's forward output, ("G", stage, mb) =
# grads w.r.t. stage's input (from B or I), ("I", stage, mb) = an input-grad backward whose W is still owed.
Key = tuple[str, int, int]
_BACKWARDS = (T.B, T.I)


def _needs(schedule: Schedule, c: Action) -> list[tuple[Key, str]]:
    """Keys computation `c` consumes, each with the rule it enforces (for error messages)."""
    mb = c.microbatch
    if c.type is T.F:
        prev = schedule.prev_stage(c.stage)
        return [] if prev is None else [(("F", prev, mb), "forward after the previous stage's forward")]
    if c.type in _BACKWARDS:
        needs = [(("F", c.stage, mb), "backward after its forward")]
        nxt = schedule.next_stage(c.stage)
        if nxt is not None:
            needs.append((("G", nxt, mb), "backward after the next stage's backward"))
        return needs
    return [(("I", c.stage, mb), "W after its I")]


def _provides(c: Action) -> list[Key]:
    if c.type is T.F:
        return [("F", c.stage, c.microbatch)]
    if c.type is T.B:
        return [("G", c.stage, c.microbatch)]
    if c.type is T.I:
        return [("G", c.stage, c.microbatch), ("I", c.stage, c.microbatch)]
    return []


def _key_text(key: Key) -> str:
    kind, stage, mb = key
    return {"F": f"{stage}F{mb}", "G": f"{stage}B{mb} (or {stage}I{mb})", "I": f"{stage}I{mb}"}[kind]


def _where(rank: int, step: int, action: Action) -> str:
    return f"rank {rank}, step {step}: action {action}"


def _check_counts(schedule: Schedule) -> None:
    """Exactly one F and one full backward (B, or I + W) per micro-batch and stage of its path."""
    seen: dict[tuple[ActionType, int, int], tuple[int, int, Action]] = {}
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            for c in action.computations():
                if c.stage not in schedule.path(c.microbatch):
                    raise ScheduleError(f"{_where(rank, step, action)}: stage {c.stage} is not on micro-batch "
                                        f"{c.microbatch}'s path {schedule.path(c.microbatch)}")
                kind = T.B if c.type is T.I else c.type  # at most one of B and I per stage and micro-batch
                if (kind, c.stage, c.microbatch) in seen:
                    first = seen[(kind, c.stage, c.microbatch)]
                    raise ScheduleError(f"{_where(rank, step, action)}: second {c.type.value} of stage {c.stage}, "
                                        f"micro-batch {c.microbatch} (first at {_where(*first)}); "
                                        "rule: exactly one F and one full backward per stage and micro-batch")
                seen[(kind, c.stage, c.microbatch)] = (rank, step, action)
    for mb in range(schedule.num_microbatches):
        for stage in schedule.path(mb):
            rank = schedule.stage_to_rank[stage]
            for kind, what in ((T.F, "forward"), (T.B, "backward (B or I)")):
                if (kind, stage, mb) not in seen:
                    raise ScheduleError(f"rank {rank}: micro-batch {mb} has no {what} on stage {stage}; "
                                        "rule: exactly one F and one full backward per stage and micro-batch")
            backward = seen[(T.B, stage, mb)][2]
            split = any(c.type is T.I and c.stage == stage for c in backward.computations())
            if split and (T.W, stage, mb) not in seen:
                raise ScheduleError(f"{_where(*seen[(T.B, stage, mb)])}: {stage}I{mb} has no {stage}W{mb}; "
                                    "rule: every I is followed by its W")
            if not split and (T.W, stage, mb) in seen:
                raise ScheduleError(f"{_where(*seen[(T.W, stage, mb)])}: {stage}W{mb} follows a full backward "
                                    f"{stage}B{mb}; rule: W only after an I")


def _check_rank_order(schedule: Schedule) -> None:
    """Dependencies whose producer sits on the same rank must come at an earlier step of that rank."""
    for rank, actions in enumerate(schedule.actions):
        done: set[Key] = set()
        for step, action in enumerate(actions):
            for c in action.computations():
                for key, rule in _needs(schedule, c):
                    if schedule.stage_to_rank[key[1]] == rank and key not in done:
                        raise ScheduleError(f"{_where(rank, step, action)} needs {_key_text(key)} earlier on "
                                            f"rank {rank}; rule: {rule}")
            for c in action.computations():
                done.update(_provides(c))


def _check_progress(schedule: Schedule) -> None:
    """Run all ranks in list order (compute only); fail if they end up waiting on each other."""
    position = [0] * schedule.num_ranks
    done: set[Key] = set()
    while True:
        progressed = False
        for rank, actions in enumerate(schedule.actions):
            while position[rank] < len(actions):
                computations = actions[position[rank]].computations()
                if any(key not in done for c in computations for key, _ in _needs(schedule, c)):
                    break
                for c in computations:
                    done.update(_provides(c))
                position[rank] += 1
                progressed = True
        if not progressed:
            break
    for rank, actions in enumerate(schedule.actions):
        if position[rank] < len(actions):
            action = actions[position[rank]]
            missing = next((key, rule) for c in action.computations() for key, rule in _needs(schedule, c)
                           if key not in done)
            raise ScheduleError(f"{_where(rank, position[rank], action)} waits forever for {_key_text(missing[0])} "
                                f"on rank {schedule.stage_to_rank[missing[0][1]]} (the ranks wait on each other); "
                                f"rule: {missing[1]}")


def validate(schedule: Schedule) -> None:
    """Check counts, per-rank dependency order and cross-rank progress; SEND/RECV actions are ignored.

    Raises:
        ScheduleError: naming rank, step, action and the unmet rule.
    """
    _check_counts(schedule)
    _check_rank_order(schedule)
    _check_progress(schedule)


def _message(key: Key, consumer_stage: int) -> tuple[Action, Action]:
    """(SEND on the producer's rank, RECV on the consumer's rank) carrying `key`."""
    kind, stage, mb = key
    if kind == "F":
        return Action(stage, T.SEND_F, mb), Action(consumer_stage, T.RECV_F, mb)
    return Action(stage, T.SEND_B, mb), Action(consumer_stage, T.RECV_B, mb)


class _Transfer(NamedTuple):
    """One cross-rank data item: who sends it, who consumes it (at which step of its list), and the two actions."""

    src: int
    dst: int
    consumer_step: int
    send: Action
    recv: Action


def _cross_rank_transfers(schedule: Schedule) -> dict[Key, _Transfer]:
    """Every data item whose producer and consumer sit on different ranks."""
    transfers = {}
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            for c in action.computations():
                for key, _ in _needs(schedule, c):
                    producer_rank = schedule.stage_to_rank[key[1]]
                    if key[0] != "I" and producer_rank != rank:
                        transfers[key] = _Transfer(producer_rank, rank, step, *_message(key, c.stage))
    return transfers


def _recv_slots(transfers: dict[Key, _Transfer], keys_in_send_order: list[Key]) -> list[tuple[int, Action]]:
    """(compute index to post before, RECV) for one rank pair: the RECVs in send order, each no later than its
    consumer nor than any later RECV (a suffix minimum over the consumer steps)."""
    placed: list[tuple[int, Action]] = []
    for key in reversed(keys_in_send_order):
        step = transfers[key].consumer_step
        placed.append((min(step, placed[-1][0]) if placed else step, transfers[key].recv))
    return placed[::-1]


def insert_p2p(schedule: Schedule) -> Schedule:
    """Add SEND/RECV actions for every cross-rank transfer of a valid compute-only schedule.

    Raises:
        ScheduleError: the input already holds SEND/RECV actions, or fails `validate`.
    """
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            if not action.is_compute:
                raise ScheduleError(f"{_where(rank, step, action)}: insert_p2p takes a compute-only schedule")
    validate(schedule)
    transfers = _cross_rank_transfers(schedule)
    with_sends: list[list[Action]] = []
    send_order: dict[tuple[int, int], list[Key]] = defaultdict(list)  # (src, dst) -> keys in send order
    for rank, actions in enumerate(schedule.actions):
        with_sends.append([])
        for action in actions:
            with_sends[rank].append(action)
            for key in (key for c in action.computations() for key in _provides(c) if key in transfers):
                with_sends[rank].append(transfers[key].send)  # right after the producing compute
                send_order[(rank, transfers[key].dst)].append(key)
    recvs_before: list[dict[int, list[Action]]] = [defaultdict(list) for _ in range(schedule.num_ranks)]
    for (_, dst), keys in sorted(send_order.items()):
        for slot, recv in _recv_slots(transfers, keys):
            recvs_before[dst][slot].append(recv)
    lowered = []
    for rank, actions in enumerate(with_sends):
        out: list[Action] = []
        compute_index = 0
        for action in actions:
            if action.is_compute:
                out += recvs_before[rank][compute_index]
                compute_index += 1
            out.append(action)
        lowered.append(tuple(out))
    return schedule.with_actions(tuple(lowered))


def _pair_order(schedule: Schedule) -> dict[tuple[int, int], tuple[list, list]]:
    """(src, dst) -> ([(step, SEND)...], [(step, RECV)...]) in list order."""
    pairs: dict[tuple[int, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    for rank, actions in enumerate(schedule.actions):
        for step, action in enumerate(actions):
            if action.type in (T.SEND_F, T.SEND_B):
                peer = schedule.next_stage(action.stage) if action.type is T.SEND_F else \
                    schedule.prev_stage(action.stage)
                if peer is None or schedule.stage_to_rank[peer] == rank:
                    raise ScheduleError(f"{_where(rank, step, action)}: no stage on another rank to send to")
                pairs[(rank, schedule.stage_to_rank[peer])][0].append((step, action))
            elif action.type in (T.RECV_F, T.RECV_B):
                peer = schedule.prev_stage(action.stage) if action.type is T.RECV_F else \
                    schedule.next_stage(action.stage)
                if peer is None or schedule.stage_to_rank[peer] == rank:
                    raise ScheduleError(f"{_where(rank, step, action)}: no stage on another rank to receive from")
                pairs[(schedule.stage_to_rank[peer], rank)][1].append((step, action))
    return pairs


def _match_messages(schedule: Schedule) -> dict[tuple[int, int], tuple[int, int]]:
    """(dst rank, RECV step) -> (src rank, SEND step), pairing the k-th SEND a -> b with the k-th RECV on b."""
    matched = {}
    for (src, dst), (send_list, recv_list) in sorted(_pair_order(schedule).items()):
        for k in range(max(len(send_list), len(recv_list))):
            if k >= len(send_list) or k >= len(recv_list):
                rank, (step, action) = (dst, recv_list[k]) if k < len(recv_list) else (src, send_list[k])
                raise ScheduleError(f"{_where(rank, step, action)}: {len(send_list)} SENDs {src} -> {dst} but "
                                    f"{len(recv_list)} RECVs; rule: every SEND has exactly one RECV")
            (send_step, send), (recv_step, recv) = send_list[k], recv_list[k]
            if _message(("F" if send.type is T.SEND_F else "G", send.stage, send.microbatch), recv.stage)[1] != recv:
                raise ScheduleError(f"{_where(dst, recv_step, recv)}: message {k} from rank {src} is {send} (step "
                                    f"{send_step}); rule: RECVs on a rank pair come in the order of the SENDs")
            matched[(dst, recv_step)] = (src, send_step)
    return matched


def _recv_key(action: Action, schedule: Schedule) -> Key:
    """The data item a RECV delivers: the previous stage's output (RECV_F) or the next stage's input grads."""
    if action.type is T.RECV_F:
        return ("F", schedule.prev_stage(action.stage), action.microbatch)  # type: ignore[return-value]
    return ("G", schedule.next_stage(action.stage), action.microbatch)  # type: ignore[return-value]


def check_p2p_order(schedule: Schedule) -> None:
    """Prove a lowered schedule deadlock-free: every SEND matches the RECV in the same position of its rank pair,
    and running all ranks under the engine's blocking rules finishes.

    Raises:
        ScheduleError: naming rank, step, action and the unmet rule (missing/mismatched message or deadlock).
    """
    matched = _match_messages(schedule)
    _check_rank_order(schedule)
    issued: set[tuple[int, int]] = set()  # (rank, step) of SENDs issued so far
    position = [0] * schedule.num_ranks
    produced: list[set[Key]] = [set() for _ in range(schedule.num_ranks)]
    posted: list[dict[Key, int]] = [{} for _ in range(schedule.num_ranks)]  # key -> step of its RECV
    blocked: dict[int, str] = {}
    progressed = True
    while progressed:
        progressed = False
        for rank, actions in enumerate(schedule.actions):
            while position[rank] < len(actions):
                step, action = position[rank], actions[position[rank]]
                if action.type in (T.SEND_F, T.SEND_B):
                    key = ("F" if action.type is T.SEND_F else "G", action.stage, action.microbatch)
                    if key not in produced[rank]:
                        raise ScheduleError(f"{_where(rank, step, action)}: sent before it is computed; "
                                            "rule: a SEND follows its producing compute")
                    issued.add((rank, step))
                elif action.type in (T.RECV_F, T.RECV_B):
                    posted[rank][_recv_key(action, schedule)] = step
                else:
                    blocked[rank] = _blocked_on(schedule, rank, step, action, posted[rank], matched, issued)
                    if blocked[rank]:
                        break
                    produced[rank].update(key for c in action.computations() for key in _provides(c))
                position[rank] += 1
                progressed = True
    for rank, actions in enumerate(schedule.actions):
        if position[rank] < len(actions):
            raise ScheduleError(f"{_where(rank, position[rank], actions[position[rank]])} deadlocks: "
                                f"{blocked[rank]}")


def _blocked_on(schedule: Schedule, rank: int, step: int, action: Action, posted: dict[Key, int],
                matched: dict[tuple[int, int], tuple[int, int]], issued: set[tuple[int, int]]) -> str:
    """Why compute `action` cannot run yet ("" if it can); raises where no RECV was posted for an input."""
    for c in action.computations():
        for key, _ in _needs(schedule, c):
            if key[0] == "I" or schedule.stage_to_rank[key[1]] == rank:
                continue
            if key not in posted:
                raise ScheduleError(f"{_where(rank, step, action)}: no RECV of {_key_text(key)} before it; "
                                    "rule: a RECV precedes its consumer")
            src, send_step = matched[(rank, posted[key])]
            if (src, send_step) not in issued:
                return (f"its RECV (step {posted[key]}) waits for {schedule.actions[src][send_step]} on rank {src}, "
                        "which is never issued; rule: a RECV completes after its matching SEND")
    return ""


def split_backward(schedule: Schedule, *, select: Callable[[Action], bool] | None = None) -> Schedule:
    """Replace each plain full backward B (all, or those `select` accepts) by I followed at once by its W.

    The backward inside an overlapped F&B pair is left alone. The result validates wherever the input does.
    """
    actions = []
    for rank_actions in schedule.actions:
        out: list[Action] = []
        for action in rank_actions:
            if action.type is T.B and (select is None or select(action)):
                out += [Action(action.stage, T.I, action.microbatch), Action(action.stage, T.W, action.microbatch)]
            else:
                out.append(action)
        actions.append(tuple(out))
    return schedule.with_actions(tuple(actions))
