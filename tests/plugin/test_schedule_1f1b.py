"""1F1B generator: DeepSpeed's TrainSchedule order (goldens traced from deepspeed 0.19.8), structure, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualmoe.errors import ScheduleError
from dualmoe.schedule import ActionType, generate
from dualmoe.schedule.lowering import validate
from dualmoe.schedule.one_f_one_b import one_f_one_b

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def read_golden(name: str) -> str:
    return "\n".join(line for line in (GOLDEN / name).read_text().splitlines() if not line.startswith("#"))


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(1, 3), (2, 1), (3, 5), (4, 2), (4, 8), (8, 20)])
def test_one_f_one_b_matches_deepspeed_golden(num_ranks: int, num_microbatches: int) -> None:
    schedule = one_f_one_b(num_ranks, num_microbatches)
    assert schedule.to_text() == read_golden(f"1f1b_p{num_ranks}_m{num_microbatches}.txt")


@pytest.mark.parametrize("num_ranks", range(1, 9))
@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 5, 8, 13])
def test_one_f_one_b_warmup_then_alternate_then_drain(num_ranks: int, num_microbatches: int) -> None:
    schedule = generate("1f1b", num_ranks, num_microbatches)
    validate(schedule)
    for rank, actions in enumerate(schedule.actions):
        num_warmup = min(num_ranks - rank - 1, num_microbatches)
        types = "".join(a.type.value for a in actions)
        steady = num_microbatches - num_warmup
        assert types == "F" * num_warmup + "FB" * steady + "B" * num_warmup
        assert [a.microbatch for a in actions if a.type is ActionType.F] == list(range(num_microbatches))
        assert [a.microbatch for a in actions if a.type is ActionType.B] == list(range(num_microbatches))
        assert {a.stage for a in actions} == {rank}


def test_one_f_one_b_in_flight_bounded_by_distance_to_last_rank() -> None:
    schedule = one_f_one_b(4, 8)
    for rank, actions in enumerate(schedule.actions):
        live = peak = 0
        for action in actions:
            live += 1 if action.type is ActionType.F else -1
            peak = max(peak, live)
        assert peak == 4 - rank


@pytest.mark.parametrize(("num_ranks", "num_microbatches", "match"), [
    (0, 4, r"1f1b: num_ranks=0 must be >= 1"),
    (2, 0, r"1f1b: num_microbatches=0 must be >= 1"),
])
def test_one_f_one_b_rejects_bad_sizes(num_ranks: int, num_microbatches: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        one_f_one_b(num_ranks, num_microbatches)
