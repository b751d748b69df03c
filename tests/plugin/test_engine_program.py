"""Rank programs: lowered schedules sliced per rank, forward-only cuts, and the queries the executor uses."""

from __future__ import annotations

import pytest
from dualmoe.program import build_program, forward_only
from dualmoe.schedule import generate
from dualmoe.schedule.ir import ActionType
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
