"""ZB-H1 and ZB-V generators: goldens (traced from torch 2.13's zero-bubble schedules), simulated bubbles
against the paper's formulas with a tiny event-driven check, activation peaks, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualmoe.errors import ScheduleError
from dualmoe.schedule import ActionType, Schedule, generate
from dualmoe.schedule.lowering import validate
from dualmoe.schedule.zero_bubble import zb1p, zbv

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T = ActionType


def read_golden(name: str) -> str:
    return "\n".join(line for line in (GOLDEN / name).read_text().splitlines() if not line.startswith("#"))


def simulate(schedule: Schedule, *, f: float, i: float, w: float) -> float:
    """Makespan when every rank runs its list in order, each action starting once its inputs are done."""
    cost = {T.F: f, T.I: i, T.W: w, T.B: i + w}
    end: dict[tuple[str, int, int], float] = {}
    free, position = [0.0] * schedule.num_ranks, [0] * schedule.num_ranks

    def inputs(a):  # keys: ("F", stage, mb) forward done, ("G", stage, mb) input grads done, ("I", ...) I done
        if a.type is T.F:
            prev = schedule.prev_stage(a.stage)
            return [] if prev is None else [("F", prev, a.microbatch)]
        if a.type is T.W:
            return [("I", a.stage, a.microbatch)]
        nxt = schedule.next_stage(a.stage)
        return [("F", a.stage, a.microbatch)] + ([] if nxt is None else [("G", nxt, a.microbatch)])

    while any(position[r] < len(schedule.actions[r]) for r in range(schedule.num_ranks)):
        progressed = False
        for rank, actions in enumerate(schedule.actions):
            while position[rank] < len(actions) and all(k in end for k in inputs(actions[position[rank]])):
                a = actions[position[rank]]
                free[rank] = max([free[rank]] + [end[k] for k in inputs(a)]) + cost[a.type]
                for kind in {T.F: "F", T.B: "G", T.I: "GI", T.W: ""}[a.type]:
                    end[(kind, a.stage, a.microbatch)] = free[rank]
                position[rank] += 1
                progressed = True
        assert progressed, "simulated ranks wait on each other"
    return max(free)


def peak_activations(actions) -> int:
    live = peak = 0
    for a in actions:
        live += {T.F: 1, T.B: -1, T.W: -1}.get(a.type, 0)
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(("num_ranks", "num_microbatches"), [(1, 3), (2, 3), (3, 5), (4, 2), (4, 8), (8, 20)])
def test_zb1p_matches_torch_golden(num_ranks: int, num_microbatches: int) -> None:
    assert zb1p(num_ranks, num_microbatches).to_text() == read_golden(f"zb1p_p{num_ranks}_m{num_microbatches}.txt")


@pytest.mark.parametrize(("num_ranks", "num_microbatches"),
                         [(1, 1), (1, 4), (2, 4), (3, 3), (4, 8), (4, 10), (8, 20)])
def test_zbv_matches_torch_golden(num_ranks: int, num_microbatches: int) -> None:
    assert zbv(num_ranks, num_microbatches).to_text() == read_golden(f"zbv_p{num_ranks}_m{num_microbatches}.txt")


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_one_f_one_b_bubble_is_p_minus_1_times_f_plus_b(num_ranks: int, factor: int) -> None:
    m = factor * num_ranks
    makespan = simulate(generate("1f1b", num_ranks, m), f=1, i=1, w=1)
    assert makespan == m * 3 + (num_ranks - 1) * 3


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize(("f", "i", "w"), [(1, 1, 1), (2, 3, 1), (2, 2, 1), (3, 2, 2)])
def test_zb1p_bubble_is_p_minus_1_times_f_plus_b_minus_2w(num_ranks: int, factor: int, f: int, i: int,
                                                           w: int) -> None:
    m = factor * num_ranks + factor - 1
    makespan = simulate(zb1p(num_ranks, m), f=f, i=i, w=w)
    assert makespan == m * (f + i + w) + (num_ranks - 1) * (f + i + w - 2 * w)


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("extra", [-1, 0, 3, 9])
def test_zbv_bubble_is_startup_only_from_2p_minus_1_microbatches(num_ranks: int, extra: int) -> None:
    m = max(1, 2 * num_ranks + extra)
    makespan = simulate(zbv(num_ranks, m), f=1, i=1, w=1)  # half-stage costs
    assert makespan == 6 * m + (num_ranks - 1)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_zero_bubble_peaks_equal_one_f_one_b_rank0(num_ranks: int) -> None:
    m = 3 * num_ranks
    assert [peak_activations(a) for a in zb1p(num_ranks, m).actions] == [num_ranks] * num_ranks
    # ZB-V counts half stages: 2P halves = P full stages, 1F1B's rank-0 peak.
    assert [peak_activations(a) for a in zbv(num_ranks, m).actions] == [2 * num_ranks] * num_ranks


@pytest.mark.parametrize("num_ranks", range(1, 9))
@pytest.mark.parametrize("num_microbatches", [1, 2, 5, 11])
def test_zb1p_rank_r_holds_back_r_weight_grads(num_ranks: int, num_microbatches: int) -> None:
    schedule = zb1p(num_ranks, num_microbatches)
    validate(schedule)
    for rank, actions in enumerate(schedule.actions):
        last_i = max(k for k, a in enumerate(actions) if a.type is T.I)
        tail = [a.type for a in actions[last_i + 1:]]
        assert tail == [T.W] * min(rank + 1, num_microbatches)
        assert [a.microbatch for a in actions if a.type is T.W] == list(range(num_microbatches))


def test_zbv_uses_v_placement() -> None:
    schedule = zbv(4, 8)
    assert schedule.stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert all(a.type is not T.B for actions in schedule.actions for a in actions)


@pytest.mark.parametrize(("fn", "num_ranks", "num_microbatches", "match"), [
    (zb1p, 0, 4, r"zb1p: num_ranks=0 must be >= 1"),
    (zb1p, 4, 0, r"zb1p: num_microbatches=0 must be >= 1"),
    (zbv, -1, 4, r"zbv: num_ranks=-1 must be >= 1"),
    (zbv, 2, 0, r"zbv: num_microbatches=0 must be >= 1"),
])
def test_zero_bubble_rejects_bad_sizes(fn, num_ranks: int, num_microbatches: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        fn(num_ranks, num_microbatches)
