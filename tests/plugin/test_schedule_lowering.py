"""Lowering passes and checks: validate, insert_p2p, check_p2p_order, split_backward; an exhaustive grid over
every schedule kind, P in 1..8 and several m."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualmoe.errors import ScheduleError
from dualmoe.schedule import SCHEDULE_KINDS, Action, ActionType, Schedule, generate
from dualmoe.schedule.lowering import check_p2p_order, insert_p2p, split_backward, validate

T = ActionType
SENDS, RECVS = (T.SEND_F, T.SEND_B), (T.RECV_F, T.RECV_B)


def valid_sizes(kind: str, num_ranks: int) -> list[int]:
    ms = {1, 2, 3, num_ranks, 2 * num_ranks, 2 * num_ranks + 1, 2 * num_ranks + 2, 3 * num_ranks + 4}
    if kind == "dualpipev":
        return sorted(m for m in ms if m >= 2 * num_ranks)
    if kind == "dualpipe":
        return sorted(m for m in ms if m >= 2 * num_ranks and m % 2 == 0) if num_ranks % 2 == 0 else []
    return sorted(ms)


GRID = [(kind, p, m) for kind in SCHEDULE_KINDS for p in range(1, 9) for m in valid_sizes(kind, p)]


def with_text(schedule: Schedule, lines: list[str]) -> Schedule:
    """`schedule` with per-rank actions read from text lines (one rank per line)."""
    return schedule.with_actions(tuple(tuple(Action.parse(t) for t in line.split()) for line in lines))


def peer_of(schedule: Schedule, rank: int, action: Action) -> int:
    stage = schedule.next_stage(action.stage) if action.type in (T.SEND_F, T.RECV_B) else \
        schedule.prev_stage(action.stage)
    return schedule.stage_to_rank[stage]


@pytest.mark.parametrize(("kind", "num_ranks", "num_microbatches"), GRID)
def test_lowering_every_kind_validates_and_lowers_deadlock_free(kind: str, num_ranks: int,
                                                                num_microbatches: int) -> None:
    schedule = generate(kind, num_ranks, num_microbatches)
    assert schedule.kind == kind
    validate(schedule)
    num_compute = {T.F: 0, T.B: 0, T.I: 0, T.W: 0}
    for actions in schedule.actions:
        for a in actions:
            for c in a.computations():
                num_compute[c.type] += 1
    per_path = num_microbatches * schedule.stages_per_copy
    assert num_compute[T.F] == per_path and num_compute[T.B] + num_compute[T.I] == per_path
    assert num_compute[T.W] == num_compute[T.I]
    lowered = insert_p2p(schedule)
    check_p2p_order(lowered)
    validate(lowered)
    compute_only = tuple(tuple(a for a in actions if a.is_compute) for actions in lowered.actions)
    assert compute_only == schedule.actions
    # One SEND per cross-rank hop: 2 x (stage boundaries between ranks) per micro-batch.
    hops = sum(schedule.stage_to_rank[s] != schedule.stage_to_rank[s + 1]
               for s in range(schedule.num_stages - 1) if schedule.next_stage(s) is not None)
    num_sends = sum(a.type in SENDS for actions in lowered.actions for a in actions)
    assert num_sends == 2 * hops * num_microbatches // schedule.num_copies


@pytest.mark.parametrize(("kind", "num_ranks", "num_microbatches"),
                         [("1f1b", 4, 8), ("zb1p", 3, 5), ("zbv", 4, 9), ("dualpipe", 4, 10), ("dualpipev", 4, 10),
                          ("dualpipev", 3, 6), ("dualpipe", 8, 20)])
def test_insert_p2p_pairs_post_in_identical_order(kind: str, num_ranks: int, num_microbatches: int) -> None:
    lowered = insert_p2p(generate(kind, num_ranks, num_microbatches))
    sent: dict[tuple[int, int], list[tuple]] = {}
    received: dict[tuple[int, int], list[tuple]] = {}
    for rank, actions in enumerate(lowered.actions):
        for a in actions:
            if a.type in SENDS:
                message = ("F" if a.type is T.SEND_F else "B", a.stage, a.microbatch)
                sent.setdefault((rank, peer_of(lowered, rank, a)), []).append(message)
            elif a.type in RECVS:
                source = lowered.prev_stage(a.stage) if a.type is T.RECV_F else lowered.next_stage(a.stage)
                message = ("F" if a.type is T.RECV_F else "B", source, a.microbatch)
                received.setdefault((peer_of(lowered, rank, a), rank), []).append(message)
    assert sent == received


def test_insert_p2p_sends_follow_producer_and_recvs_precede_consumer() -> None:
    lowered = insert_p2p(generate("dualpipev", 4, 9))
    for rank, actions in enumerate(lowered.actions):
        for step, a in enumerate(actions):
            if a.type in SENDS:  # right after its producer: only other SENDs in between
                producer = next(b for b in reversed(actions[:step]) if b.is_compute)
                types = (T.F,) if a.type is T.SEND_F else (T.B, T.I)
                assert any((c.stage, c.microbatch) == (a.stage, a.microbatch) and c.type in types
                           for c in producer.computations()), (rank, step, a)
            elif a.type in RECVS:  # consumed later on this rank
                types = (T.F,) if a.type is T.RECV_F else (T.B, T.I)
                assert any((c.stage, c.microbatch) == (a.stage, a.microbatch) and c.type in types
                           for b in actions[step + 1:] for c in b.computations()), (rank, step, a)


def test_insert_p2p_keeps_v_turnaround_local() -> None:
    lowered = insert_p2p(generate("dualpipev", 4, 8))
    last = lowered.actions[3]
    assert not [a for a in last if a.type in SENDS + RECVS and a.stage in (3, 4) and
                peer_of(lowered, 3, a) == 3]
    assert {a.stage for a in last if a.type is T.SEND_F} == {4}  # stage 3 hands over locally
    assert {a.stage for a in last if a.type is T.SEND_B} == {3}  # stage 4 hands its grads back locally


def test_insert_p2p_one_f_one_b_example() -> None:
    lowered = insert_p2p(generate("1f1b", 2, 2))
    assert lowered.to_text() == ("0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1\n"
                                 "1: 1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1")


def test_insert_p2p_pulls_recv_forward_to_keep_sender_order() -> None:
    # Rank 0 sends mb 0 then mb 1, rank 1 consumes mb 1 first (and sends its grads back in that order): each
    # side posts both RECVs before the first consumer, in the sender's order.
    base = generate("1f1b", 2, 2)
    lowered = insert_p2p(with_text(base, ["0F0 0F1 0B0 0B1", "1F1 1B1 1F0 1B0"]))
    assert lowered.to_text() == ("0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B1 0RECV_B0 0B0 0B1\n"
                                 "1: 1RECV_F0 1RECV_F1 1F1 1B1 1SEND_B1 1F0 1B0 1SEND_B0")
    check_p2p_order(lowered)
    swapped = with_text(base, ["0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0RECV_B1 0B0 0B1",
                               "1RECV_F0 1RECV_F1 1F1 1B1 1SEND_B1 1F0 1B0 1SEND_B0"])
    with pytest.raises(ScheduleError, match=r"rank 0, step 4: action 0RECV_B0: message 0 from rank 1 is 1SEND_B1"):
        check_p2p_order(swapped)


def test_insert_p2p_rejects_lowered_input() -> None:
    lowered = insert_p2p(generate("1f1b", 2, 2))
    with pytest.raises(ScheduleError, match=r"rank 0, step 1: action 0SEND_F0: insert_p2p takes a compute-only"):
        insert_p2p(lowered)


def test_check_p2p_order_detects_deadlock() -> None:
    base = generate("1f1b", 2, 1)
    schedule = with_text(base, ["0F0 0RECV_B0 0B0 0SEND_F0", "1RECV_F0 1F0 1B0 1SEND_B0"])
    with pytest.raises(ScheduleError, match=r"rank 0, step 2: action 0B0 deadlocks: .*waits for 1SEND_B0 on rank 1"):
        check_p2p_order(schedule)


def test_check_p2p_order_detects_missing_and_unmatched_messages() -> None:
    base = generate("1f1b", 2, 1)
    with pytest.raises(ScheduleError, match=r"rank 1, step 0: action 1F0: no RECV of 0F0 before it"):
        check_p2p_order(with_text(base, ["0F0 0SEND_F0 0RECV_B0 0B0", "1F0 1RECV_F0 1B0 1SEND_B0"]))
    with pytest.raises(ScheduleError, match=r"rank 1, step 0: action 1RECV_F0: 0 SENDs 0 -> 1 but 1 RECVs"):
        check_p2p_order(with_text(base, ["0F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]))
    with pytest.raises(ScheduleError, match=r"rank 0, step 0: action 0SEND_F0: sent before it is computed"):
        check_p2p_order(with_text(base, ["0SEND_F0 0F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]))


def test_validate_reports_rank_step_action_and_rule() -> None:
    base = generate("1f1b", 2, 2)
    cases = [
        (["0F0 0F1 0B0", "1F0 1B0 1F1 1B1"], r"rank 0: micro-batch 1 has no backward \(B or I\) on stage 0"),
        (["0F0 0F1 0B0 0B1 0B1", "1F0 1B0 1F1 1B1"], r"rank 0, step 4: action 0B1: second B of stage 0"),
        (["0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"], r"rank 0, step 1: action 0B0 waits forever for 1B0 .*on rank 1"),
        (["0F0 0F1 0B0 0B1", "1B0 1F0 1F1 1B1"], r"rank 1, step 0: action 1B0 needs 1F0 earlier on rank 1; "
                                                 r"rule: backward after its forward"),
        (["0F0 0F1 0B0 0B1", "1F0 1W0 1I0 1F1 1B1"], r"rank 1, step 1: action 1W0 needs 1I0 earlier on rank 1; "
                                                     r"rule: W after its I"),
        (["0F0 0F1 0B0 0B1", "1F0 1I0 1F1 1B1"], r"rank 1, step 1: action 1I0: 1I0 has no 1W0"),
        (["0F0 0F1 0B0 0W0 0B1", "1F0 1B0 1F1 1B1"], r"rank 0, step 3: action 0W0: 0W0 follows a full backward"),
    ]
    for lines, match in cases:
        with pytest.raises(ScheduleError, match=match):
            validate(with_text(base, lines))


def test_validate_rejects_stage_off_the_microbatch_path() -> None:
    base = generate("dualpipe", 2, 4)  # micro-batches 0, 1 walk copy 0 (stages 0, 1) only
    text = base.to_text().splitlines()
    broken = [line.split(": ", 1)[1] for line in text]
    broken[0] = broken[0].replace("3F2", "3F0", 1)
    with pytest.raises(ScheduleError, match=r"rank 0, step 1: action 3F0: stage 3 is not on micro-batch 0's path"):
        validate(with_text(base, broken))


def test_validate_rejects_overlapped_pair_depending_on_itself() -> None:
    base = generate("1f1b", 1, 1)
    with pytest.raises(ScheduleError, match=r"rank 0, step 0: action 0F0&0B0 needs 0F0 earlier on rank 0"):
        validate(with_text(base, ["0F0&0B0"]))


@pytest.mark.parametrize("kind", ["1f1b", "dualpipev", "dualpipe"])
def test_split_backward_turns_every_plain_b_into_i_then_w(kind: str) -> None:
    schedule = generate(kind, 4, 10)
    split = split_backward(schedule)
    validate(split)
    check_p2p_order(insert_p2p(split))
    assert not [a for actions in split.actions for a in actions if a.type is T.B]
    plain_b = sum(a.type is T.B for actions in schedule.actions for a in actions)
    new_w = sum(a.type is T.W for actions in split.actions for a in actions) - \
        sum(a.type is T.W for actions in schedule.actions for a in actions)
    assert new_w == plain_b


def test_split_backward_only_where_selected() -> None:
    schedule = generate("1f1b", 2, 3)
    split = split_backward(schedule, select=lambda a: a.stage == 0)
    assert split.to_text() == ("0: 0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2\n"
                               "1: 1F0 1B0 1F1 1B1 1F2 1B2")


def test_generate_rejects_unknown_kind() -> None:
    with pytest.raises(ScheduleError, match=r"schedule kind 'gpipe' is unknown; valid kinds: 1f1b, zb1p"):
        generate("gpipe", 2, 4)


@pytest.mark.parametrize(("kind", "num_ranks", "num_microbatches"), [("dualpipev", 4, 10), ("dualpipe", 4, 8)])
def test_insert_p2p_matches_pinned_golden(kind: str, num_ranks: int, num_microbatches: int) -> None:
    path = Path(__file__).resolve().parents[1] / "golden" / f"{kind}_p{num_ranks}_m{num_microbatches}_lowered.txt"
    golden = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    assert insert_p2p(generate(kind, num_ranks, num_microbatches)).to_text() == golden
