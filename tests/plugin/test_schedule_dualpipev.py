"""DualPipeV generator: goldens traced from deepseek-ai/DualPipe's `DualPipeV.step()`, the closed-form count
of every one of the eight steps, the reference's special cases, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualmoe.errors import ScheduleError
from dualmoe.schedule import Action, ActionType
from dualmoe.schedule.dualpipev import dualpipev, eight_steps
from dualmoe.schedule.lowering import validate

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T = ActionType
GOLDEN_CASES = sorted({(p, m) for p in (1, 2, 4, 8) for m in (2 * p, 2 * p + 1, 3 * p, 20) if m >= 2 * p} | {(4, 10)})


def read_golden(name: str) -> str:
    return "\n".join(line for line in (GOLDEN / name).read_text().splitlines() if not line.startswith("#"))


def tokens(actions: list[Action], stage_of_phase: tuple[int, int]) -> list[str]:
    """Actions as phase patterns: 'F0', 'I1', 'B0', 'W', 'F1&B0'."""
    def one(a: Action) -> str:
        return "W" if a.type is T.W else f"{a.type.value}{stage_of_phase.index(a.stage)}"
    return [one(a.pair[0]) + "&" + one(a.pair[1]) if a.type is T.FB else one(a) for a in actions]


def expected_steps(num_ranks: int, rank: int, m: int) -> list[list[str]]:
    """The closed forms of notes section 1.2 / the reference's step comments, per step."""
    n_out, n_in = num_ranks - rank - 1, rank + 1  # count of steps 1/3/5/7 is P-r-1 (x2 for step 1)
    step4 = ["F0&B1", "F1&B0"] * (m - 2 * num_ranks + rank + 1)
    if rank == num_ranks - 1:  # the last rank does not overlap its first step-4 pair
        step4[0:1] = ["F0", "B1"]
    # Step 6 alternates phases 1, 0; its second half is split (the reference's parity rule amounts to this).
    step6 = [f"{kind}{phase}" for kind, phase in zip(["B"] * n_in + ["I"] * n_in, (1, 0) * n_in)]
    return [["F0"] * 2 * n_out, ["F0", "F1"] * n_in, ["I1", "W", "F1"] * n_out, step4, ["B1", "F1&B0"] * n_out,
            step6, ["W", "I0"] * n_out, ["W"] * n_in]


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), GOLDEN_CASES)
def test_dualpipev_matches_reference_golden(num_ranks: int, num_microbatches: int) -> None:
    schedule = dualpipev(num_ranks, num_microbatches)
    assert schedule.to_text() == read_golden(f"dualpipev_p{num_ranks}_m{num_microbatches}.txt")


@pytest.mark.parametrize("num_ranks", range(1, 9))
@pytest.mark.parametrize("extra", [0, 1, 3, 10])
def test_dualpipev_step_counts_match_closed_forms(num_ranks: int, extra: int) -> None:
    m = 2 * num_ranks + extra
    for rank in range(num_ranks):
        stage_of_phase = (rank, 2 * num_ranks - 1 - rank)
        steps = eight_steps(num_ranks, rank, m, lambda k, p, c, s=stage_of_phase: Action(s[p], k, c))
        assert [tokens(step, stage_of_phase) for step in steps] == expected_steps(num_ranks, rank, m)


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_dualpipev_step6_splits_second_half_of_its_backwards(num_ranks: int) -> None:
    for rank in range(num_ranks):
        stage_of_phase = (rank, 2 * num_ranks - 1 - rank)
        step6 = eight_steps(num_ranks, rank, 2 * num_ranks, lambda k, p, c, s=stage_of_phase: Action(s[p], k, c))[5]
        kinds = [a.type for a in step6]
        assert kinds == [T.B] * (rank + 1) + [T.I] * (rank + 1)
        # The phases alternate 1, 0, 1, 0, ... whatever the parity of rank.
        assert [stage_of_phase.index(a.stage) for a in step6] == [1, 0] * (rank + 1)


@pytest.mark.parametrize("num_ranks", range(1, 9))
@pytest.mark.parametrize("extra", [0, 5])
def test_dualpipev_valid_and_weight_grads_pop_first_in_first_out(num_ranks: int, extra: int) -> None:
    schedule = dualpipev(num_ranks, 2 * num_ranks + extra)
    validate(schedule)
    for actions in schedule.actions:
        splits = [(a.stage, a.microbatch) for a in actions if a.type is T.I]
        weights = [(a.stage, a.microbatch) for a in actions if a.type is T.W]
        assert weights == splits


def test_dualpipev_last_rank_runs_first_step4_pair_back_to_back() -> None:
    last = dualpipev(4, 10).actions[3]
    first_pair = next(k for k, a in enumerate(last) if a.type in (T.B, T.FB))
    assert [str(a) for a in last[first_pair - 1:first_pair + 2]] == ["3F4", "4B0", "4F4&3B0"]
    assert all(a.type is not T.FB or a.pair[1].type is T.B for actions in dualpipev(4, 10).actions for a in actions)


def test_dualpipev_places_stages_in_a_v() -> None:
    schedule = dualpipev(4, 8)
    assert schedule.num_stages == 8
    assert schedule.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert schedule.path(5) == tuple(range(8))


@pytest.mark.parametrize(("num_ranks", "num_microbatches", "match"), [
    (4, 7, r"dualpipev: num_microbatches=7 must be >= 2 x num_ranks \(8\)"),
    (1, 1, r"dualpipev: num_microbatches=1 must be >= 2 x num_ranks \(2\)"),
    (0, 4, r"dualpipev: num_ranks=0 must be >= 1"),
])
def test_dualpipev_rejects_bad_sizes(num_ranks: int, num_microbatches: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        dualpipev(num_ranks, num_microbatches)
