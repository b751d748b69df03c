"""Rank programs: lowered schedules sliced per rank, forward-only cuts, and the queries the executor uses."""

from __future__ import annotations

import pytest
from dualmoe.program import build_program, forward_only, message_links, split_serial_pairs
from dualmoe.schedule import generate
from dualmoe.schedule.ir import Action, ActionType
from dualmoe.schedule.lowering import check_p2p_order, insert_p2p


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "zbv", "dualpipev", "dualpipe"])
def test_program_forward_only_keeps_forwards_and_their_messages(kind: str) -> None:
    lowered = insert_p2p(generate(kind, 4, 8))
    cut = forward_only(lowered)
    for full, rank_actions in zip(lowered.actions, cut.actions):
        assert {a.type for a in rank_actions} <= {ActionType.F, ActionType.SEND_F, ActionType.RECV_F}
        forwards = [c for a in full for c in a.computations() if c.type is ActionType.F]
        assert [a for a in rank_actions if a.type is ActionType.F] == forwards
    # Every forward message still pairs up in order.
    for rank, rank_actions in enumerate(cut.actions):
        sends = [a for a in rank_actions if a.type is ActionType.SEND_F]
        assert len(sends) == sum(1 for a in rank_actions if a.type is ActionType.F and not cut.is_last(a.stage)
                                 and cut.stage_to_rank[cut.next_stage(a.stage)] != rank)


def test_program_lowered_training_programs_are_deadlock_free() -> None:
    for kind in ("1f1b", "zb1p", "zbv", "dualpipev", "dualpipe"):
        check_p2p_order(build_program(kind, 4, 8, 0, train=True).schedule)


def test_program_queries_name_data_local_and_message_sources() -> None:
    v = build_program("dualpipev", 2, 4, 1, train=True)
    assert v.input_source(1) == "recv" and v.input_source(2) == "local" and v.grad_source(1) == "local"
    assert v.grad_source(2) == "recv" and v.next_rank(2) == 0 and v.prev_rank(1) == 0
    assert not v.loads_data() and v.loss_ranks() == (0,)
    first = build_program("dualpipev", 2, 4, 0, train=False)
    assert first.input_source(0) == "data" and first.grad_source(3) == "loss" and first.loads_data()
    assert not first.train and first.num_microbatches == 4
    dual = build_program("dualpipe", 4, 8, 3, train=True)
    assert dual.loads_data() and dual.loss_ranks() == (0, 3)
    assert build_program("1f1b", 4, 8, 1, train=True).loss_ranks() == (3,)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "zbv", "dualpipev", "dualpipe"])
def test_program_message_links_are_the_neighbour_pairs_every_schedule_uses(kind: str) -> None:
    # Every schedule sends both ways between pipeline neighbours and nowhere else; the engine warms these up.
    assert message_links(insert_p2p(generate(kind, 4, 8))) == ((0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2))
    if kind != "dualpipe":  # (needs an even P)
        assert message_links(insert_p2p(generate(kind, 1, 4))) == ()


@pytest.mark.parametrize("kind", ["dualpipev", "dualpipe"])
def test_program_serial_pairs_split_into_forward_send_backward_and_stay_deadlock_free(kind: str) -> None:
    lowered = insert_p2p(generate(kind, 4, 10))
    split = lowered.with_actions(tuple(split_serial_pairs(actions, lambda a: True) for actions in lowered.actions))
    check_p2p_order(split)
    for full, cut in zip(lowered.actions, split.actions):
        assert ActionType.FB not in {a.type for a in cut}
        pairs = [a for a in full if a.type is ActionType.FB]
        assert len(cut) == len(full) + len(pairs)
        for pair in pairs:  # F, then its SEND_F when it has one, then B
            f, b = pair.pair
            at = cut.index(f)
            send = Action(f.stage, ActionType.SEND_F, f.microbatch)
            assert cut[at + 1:at + 3] in ((send, b), (b, cut[at + 2])) and (send in full) == (cut[at + 1] == send)
        # Sends keep their order: every peer receives the same message sequence.
        assert [a for a in cut if a.type in (ActionType.SEND_F, ActionType.SEND_B)] == \
            [a for a in full if a.type in (ActionType.SEND_F, ActionType.SEND_B)]
    first = next(a for a in lowered.actions[0] if a.type is ActionType.FB)
    kept = split_serial_pairs(lowered.actions[0], lambda a: a != first)  # only pairs that run serially split
    assert [a for a in kept if a.type is ActionType.FB] == [first]
