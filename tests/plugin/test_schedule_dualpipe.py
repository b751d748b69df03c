"""DualPipe (bidirectional) generator: goldens traced from deepseek-ai/DualPipe's `DualPipe.step()`, the
half-rank step counts, phase and copy mapping, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualmoe.errors import ScheduleError
from dualmoe.schedule import ActionType
from dualmoe.schedule.dualpipe import _rank_actions, dualpipe
from dualmoe.schedule.lowering import validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T = ActionType
GOLDEN_CASES = sorted({(p, m) for p in (2, 4, 8) for m in (2 * p, 2 * p + 2, 20)} | {(6, 14)})


def read_golden(name: str) -> str:
    return "\n".join(line for line in (GOLDEN / name).read_text().splitlines() if not line.startswith("#"))


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GOLDEN_CASES)
def test_dualpipe_matches_reference_golden(num_ranks: int, num_microbatches: int) -> None:
    schedule = dualpipe(num_ranks, num_microbatches)
    assert schedule.to_text() == read_golden(f"dualpipe_p{num_ranks}_m{num_microbatches}.txt")


@pytest.mark.parametrize("num_ranks", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 2, 6])
def test_dualpipe_step_counts_follow_half_ranks(num_ranks: int, extra: int) -> None:
    m = 2 * num_ranks + extra
    half_ranks, half_chunks = num_ranks // 2, m // 2
    for rank in range(num_ranks):
        h = min(rank, num_ranks - 1 - rank)
        steps = _rank_actions(num_ranks, m, rank)
        n_out, n_in = half_ranks - h - 1, h + 1
        n4 = half_chunks - num_ranks + h + 1
        middle = h == half_ranks - 1
        assert [len(step) for step in steps] == [2 * n_out, 2 * n_in, 3 * n_out, 2 * n4 + middle, 2 * n_out,
                                                 2 * n_in, 2 * n_out, n_in]
        assert sum(a.type is T.I for step in steps for a in step) == 2 * n_out + n_in


@pytest.mark.parametrize("num_ranks", [2, 4, 6, 8])
def test_dualpipe_second_half_ranks_swap_phases(num_ranks: int) -> None:
    schedule = dualpipe(num_ranks, 2 * num_ranks)
    for rank in range(num_ranks):
        # Every rank starts with phase 0: copy 0 (stage r) on the first half, copy 1 (stage 2P-1-r) on the second.
        own_copy_stage = rank if rank < num_ranks // 2 else 2 * num_ranks - 1 - rank
        assert schedule.actions[rank][0].stage == own_copy_stage
        assert schedule.actions[rank][0].type is T.F


@pytest.mark.parametrize("num_ranks", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 4])
def test_dualpipe_copies_and_microbatches(num_ranks: int, extra: int) -> None:
    m = 2 * num_ranks + extra
    schedule = dualpipe(num_ranks, m)
    validate(schedule)
    assert schedule.num_copies == 2
    assert schedule.stage_to_rank == tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))
    for actions in schedule.actions:
        for a in actions:
            for c in a.computations():
                assert schedule.copy_of(c.microbatch) == c.stage // num_ranks
        splits = [(a.stage, a.microbatch) for a in actions if a.type is T.I]
        assert [(a.stage, a.microbatch) for a in actions if a.type is T.W] == splits
    # Mirrored ranks r and P-1-r compute the same model parts.
    for rank in range(num_ranks):
        parts = {schedule.model_part(s) for s in schedule.stages_of(rank)}
        assert parts == {schedule.model_part(s) for s in schedule.stages_of(num_ranks - 1 - rank)}


def test_dualpipe_middle_ranks_do_not_overlap_first_step4_pair() -> None:
    schedule = dualpipe(4, 8)
    assert [str(a) for a in schedule.actions[1][4:7]] == ["1F2", "6B4", "6F6&1B0"]
    assert [str(a) for a in schedule.actions[2][4:7]] == ["5F6", "2B0", "2F2&5B4"]


@pytest.mark.parametrize(("num_ranks", "num_microbatches", "match"), [
    (8, 7, r"dualpipe: num_microbatches=7 must be even and >= 2 x num_ranks \(16\)"),
    (4, 6, r"dualpipe: num_microbatches=6 must be even and >= 2 x num_ranks \(8\)"),
    (4, 9, r"dualpipe: num_microbatches=9 must be even and >= 2 x num_ranks \(8\)"),
    (3, 12, r"dualpipe: num_ranks=3 must be an even number >= 2"),
    (0, 12, r"dualpipe: num_ranks=0 must be an even number >= 2"),
])
def test_dualpipe_rejects_bad_sizes(num_ranks: int, num_microbatches: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        dualpipe(num_ranks, num_microbatches)
