"""Tests of the discrete-event simulator: hand-checked timelines, errors, and the DualPipe README table.

Bubble = the worst rank's idle time (`Timeline.bubble`). Costs are per stage; V schedules (DualPipeV)
are checked in their own half-stage units: with per-stage costs f, b, w, fb the README's DualPipeV
row (PP/2-1)(F&B+B-3W), PP = 2P stages, reads (P-1)(fb+b-3w). docs/schedules.md derives every exact
value asserted here from the generated orders.
"""

from __future__ import annotations

import pytest
from dualmoe.errors import ConfigError, ScheduleError
from dualmoe.schedule import Action, ActionType, Schedule, generate, insert_p2p
from dualmoe.simulator import CostModel, simulate

README_COSTS = CostModel(forward=1, backward=2, weight_grad=1, overlap=3)  # F = I = W = 1, F&B = F + B
OVERLAP_COSTS = CostModel(forward=1, backward=2, weight_grad=1, overlap=2.5)  # F&B < F + B
GRID = [(p, m) for p in (2, 4, 8, 16) for m in sorted({2 * p, 2 * p + 2, 5 * p, 8 * p})]


def _schedule(lines: list[str], *, stage_to_rank: tuple[int, ...], num_microbatches: int, kind: str = "hand",
              num_copies: int = 1) -> Schedule:
    actions = tuple(tuple(Action.parse(t) for t in line.split()) for line in lines)
    return Schedule(kind=kind, num_ranks=len(lines), num_microbatches=num_microbatches,
                    num_stages=len(stage_to_rank), stage_to_rank=stage_to_rank, actions=actions,
                    num_copies=num_copies)


def _spans(timeline, rank):
    return [(e.args["action"], e.start_us, e.end_us) for e in timeline.compute_events(rank)]


ONE_F_ONE_B_2X2 = _schedule(["0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"], stage_to_rank=(0, 1), num_microbatches=2)


# --- CostModel -----------------------------------------------------------------------------------------


def test_cost_model_defaults_and_derived_costs():
    costs = CostModel(forward=1, backward=2, weight_grad=0.5)
    assert costs.input_grad == 1.5
    assert costs.forward_backward == 3  # F&B defaults to F + B
    assert costs.duration(Action.parse("0F1&1B0")) == 3
    assert costs.duration(Action.parse("0F1&1I0")) == 2.5  # F&B - W
    assert costs.duration(Action.parse("0SEND_F1")) == 0
    assert costs.scaled(0.5) == CostModel(forward=0.5, backward=1, weight_grad=0.25)


def test_cost_model_parse_round_trips():
    costs = CostModel.parse("F=1, B=2, w=1, FB=2.5, P2P=0.25")
    assert costs == CostModel(forward=1, backward=2, weight_grad=1, overlap=2.5, p2p_latency=0.25)
    assert CostModel.parse(str(costs)) == costs


@pytest.mark.parametrize(("text", "message"), [
    ("F=1,B=2,W=2", r"W=2 must be < B=2"),
    ("F=1,B=2,FB=1.5", r"FB=1.5 must be >= max\(F, B\) = 2"),
    ("F=0,B=2", r"F=0 and B=2 must both be > 0"),
    ("F=1,B=-2", r"backward=-2.0 must be a finite number >= 0"),
    ("F=1,B=nan", r"backward=nan must be a finite number"),
    ("F=1,B=2,X=3", r"cost item 'X=3': expected KEY=NUMBER with KEY one of F, B, W, FB, P2P"),
    ("F=1,B=two", r"cost B='two' is not a number"),
    ("F=1,F=2,B=2", r"cost key F given twice"),
    ("W=1", r"lack F and B"),
])
def test_cost_model_rejects_bad_costs(text, message):
    with pytest.raises(ConfigError, match=message):
        CostModel.parse(text)


# --- hand-checked timelines ----------------------------------------------------------------------------


def test_simulate_two_rank_1f1b_by_hand():
    timeline = simulate(ONE_F_ONE_B_2X2, README_COSTS)
    assert _spans(timeline, 0) == [("0F0", 0, 1), ("0F1", 1, 2), ("0B0", 4, 6), ("0B1", 7, 9)]
    assert _spans(timeline, 1) == [("1F0", 1, 2), ("1B0", 2, 4), ("1F1", 4, 5), ("1B1", 5, 7)]
    assert timeline.makespan == 9
    assert timeline.idle_per_rank == (3, 3)
    assert timeline.bubble == 3
    assert timeline.peak_activations_per_rank == (2, 1)


def test_simulate_adds_latency_to_cross_rank_dependencies():
    timeline = simulate(ONE_F_ONE_B_2X2, CostModel(forward=1, backward=2, p2p_latency=0.5))
    assert _spans(timeline, 1) == [("1F0", 1.5, 2.5), ("1B0", 2.5, 4.5), ("1F1", 4.5, 5.5), ("1B1", 5.5, 7.5)]
    assert _spans(timeline, 0)[2:] == [("0B0", 5, 7), ("0B1", 8, 10)]
    assert timeline.makespan == 10


def test_simulate_lowered_schedule_matches_compute_only_and_traces_p2p():
    costs = CostModel(forward=1, backward=2, p2p_latency=0.5)
    lowered = simulate(insert_p2p(ONE_F_ONE_B_2X2), costs)
    plain = simulate(ONE_F_ONE_B_2X2, costs)
    assert [_spans(lowered, r) for r in (0, 1)] == [_spans(plain, r) for r in (0, 1)]
    sends = [(e.rank, e.name, e.start_us, e.dur_us) for e in lowered.events if e.stream == "send"]
    assert (0, "dualmoe/SEND_F/s0/mb0", 1, 0.5) in sends
    recvs = [(e.rank, e.name, e.start_us, e.end_us) for e in lowered.events if e.stream == "recv"]
    assert (1, "dualmoe/RECV_F/s1/mb0", 1, 1.5) in recvs


def test_simulate_recv_posted_early_does_not_block():
    """RECVs are non-blocking: posting all of rank 1's RECVs first (prefetch) changes no compute time."""
    lowered = insert_p2p(ONE_F_ONE_B_2X2)
    rank1 = lowered.actions[1]
    prefetched = tuple(a for a in rank1 if a.type is ActionType.RECV_F) + tuple(
        a for a in rank1 if a.type is not ActionType.RECV_F)
    timeline = simulate(lowered.with_actions((lowered.actions[0], prefetched)), README_COSTS)
    assert timeline.makespan == simulate(ONE_F_ONE_B_2X2, README_COSTS).makespan


def test_simulate_overlapped_pair_waits_for_both_parts_and_lasts_fb():
    # rank 1's pair needs 1F1 (after 0F1 ends at 2) and 1B0 (after its own 1F0): it starts at 2.
    schedule = _schedule(["0F0 0F1 0B0 0B1", "1F0 1F1&1B0 1B1"], stage_to_rank=(0, 1), num_microbatches=2)
    timeline = simulate(schedule, OVERLAP_COSTS)
    assert _spans(timeline, 1) == [("1F0", 1, 2), ("1F1&1B0", 2, 4.5), ("1B1", 4.5, 6.5)]
    event = timeline.compute_events(1)[1]
    assert event.name == "dualmoe/FB/s1/mb1+s1/mb0"
    assert (event.args["forward"], event.args["backward"]) == ("1F1", "1B0")
    assert timeline.busy_per_rank[1] == 1 + 2.5 + 2


def test_simulate_counts_activations_until_w_ends():
    # One stage: 0F0 +1, 0F1 +1 -> 2 live; 0I0 frees nothing; 0W0 frees mb 0; 0F2 -> 2 again; ...
    schedule = _schedule(["0F0 0F1 0I0 0F2 0W0 0B1 0I2 0W2"], stage_to_rank=(0,), num_microbatches=3)
    timeline = simulate(schedule, README_COSTS)
    assert timeline.peak_activations_per_rank == (3,)
    split_late = _schedule(["0F0 0F1 0I0 0W0 0F2 0B1 0I2 0W2"], stage_to_rank=(0,), num_microbatches=3)
    assert simulate(split_late, README_COSTS).peak_activations_per_rank == (2,)


# --- errors --------------------------------------------------------------------------------------------


def test_simulate_names_ranks_actions_and_dependencies_of_a_deadlock():
    # rank 1 wants micro-batch 1 first; rank 0 only sends it after 0B0, which needs 1B0, which comes later.
    schedule = _schedule(["0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1"], stage_to_rank=(0, 1), num_microbatches=2)
    with pytest.raises(ScheduleError) as info:
        simulate(schedule, README_COSTS)
    message = str(info.value)
    assert "schedule hand (P=2, m=2) cannot finish" in message
    assert "rank 0 at step 1 (0B0) waits for 1B0 (or 1I0) (rank 1, step 2; rank 1 is stuck at step 0 on 1F1)" \
        in message
    assert "rank 1 at step 0 (1F1) waits for 0F1 (rank 0, step 2; rank 0 is stuck at step 1 on 0B0)" in message


def test_simulate_reports_an_action_listed_after_its_consumer():
    schedule = _schedule(["0B0 0F0"], stage_to_rank=(0,), num_microbatches=1)
    with pytest.raises(ScheduleError, match=r"rank 0 at step 0 \(0B0\) waits for 0F0, which comes later on rank 0"):
        simulate(schedule, README_COSTS)


def test_simulate_reports_a_dependency_no_rank_runs():
    schedule = _schedule(["0F0 0B0 0W0"], stage_to_rank=(0,), num_microbatches=1)
    with pytest.raises(ScheduleError, match=r"\(0W0\) waits for 0I0, which no rank's list contains"):
        simulate(schedule, README_COSTS)


def test_simulate_rejects_duplicate_and_missing_work():
    twice = _schedule(["0F0 0F0 0B0"], stage_to_rank=(0,), num_microbatches=1)
    with pytest.raises(ScheduleError, match=r"rank 0, step 1: 0F0 runs twice \(first on rank 0, step 0\)"):
        simulate(twice, README_COSTS)
    missing = _schedule(["0F0 0F1 0B0"], stage_to_rank=(0,), num_microbatches=2)
    with pytest.raises(ScheduleError, match=r"is incomplete: 0B1 \(or 0W1\) never runs"):
        simulate(missing, README_COSTS)


def test_simulate_rejects_lowered_schedule_with_recvs_out_of_send_order():
    lowered = insert_p2p(generate("1f1b", 2, 3))
    rank1 = list(lowered.actions[1])
    first, second = (i for i, a in enumerate(rank1) if a.type is ActionType.RECV_F and a.microbatch in (0, 1))
    rank1[first], rank1[second] = rank1[second], rank1[first]
    with pytest.raises(ScheduleError, match=r"RECV"):
        simulate(lowered.with_actions((lowered.actions[0], tuple(rank1))), README_COSTS)


# --- the DualPipe README table -------------------------------------------------------------------------


def _published_bubble(kind: str, num_ranks: int, costs: CostModel) -> float:
    """The README's Bubble column in each schedule's own stage units (module docstring)."""
    f, b, w, fb = costs.forward, costs.backward, costs.weight_grad, costs.forward_backward
    return {"1f1b": (num_ranks - 1) * (f + b), "zb1p": (num_ranks - 1) * (f + b - 2 * w),
            "dualpipe": (num_ranks / 2 - 1) * (fb + b - 3 * w), "dualpipev": (num_ranks - 1) * (fb + b - 3 * w)}[kind]


def _published_peaks(kind: str, num_ranks: int) -> tuple[int, ...]:
    """Activation column P, P, P+1, PP+1 (PP = 2P half stages); 1F1B's rank r holds only P - r."""
    if kind == "1f1b":
        return tuple(num_ranks - r for r in range(num_ranks))
    return ({"zb1p": num_ranks, "dualpipe": num_ranks + 1, "dualpipev": 2 * num_ranks + 1}[kind],) * num_ranks


@pytest.mark.parametrize("costs", [README_COSTS, OVERLAP_COSTS], ids=["fb=f+b", "fb<f+b"])
@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_simulate_reproduces_published_bubble_and_activations(kind, costs):
    for num_ranks, num_microbatches in GRID:
        timeline = simulate(generate(kind, num_ranks, num_microbatches), costs)
        published = _published_bubble(kind, num_ranks, costs)
        assert timeline.bubble == pytest.approx(published), (num_ranks, num_microbatches)
        assert timeline.peak_activations_per_rank == _published_peaks(kind, num_ranks), (num_ranks, num_microbatches)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_simulate_bubble_is_makespan_minus_work_without_overlap(kind):
    """With F&B = F + B every rank does the same m(F+B) of work (2m per-stage F and B on a V), so
    bubble = makespan - m(F+B) on every rank."""
    stage_work = 2 if kind == "dualpipev" else 1
    for num_ranks, num_microbatches in GRID[:8]:
        timeline = simulate(generate(kind, num_ranks, num_microbatches), README_COSTS)
        work = stage_work * num_microbatches * (README_COSTS.forward + README_COSTS.backward)
        assert set(timeline.idle_per_rank) == {timeline.makespan - work} == {timeline.bubble}


def _exact_dualpipe_bubble(hops: int, costs: CostModel) -> float:
    """Derived in docs/schedules.md from the critical chains of the generated order; hops = P/2-1 (DualPipe)
    or P-1 (DualPipeV). The README's hops*(F&B+B-3W) equals the first term when F = I >= W."""
    f, i, w, b, fb = costs.forward, costs.input_grad, costs.weight_grad, costs.backward, costs.forward_backward
    return max(hops * (fb + f - 2 * w), hops * (fb + i - 2 * w) - f, hops * (fb + f - b), hops * (fb - w) - f)


# (F, B, W, F&B) where the published DualPipe formula is off: forward slower than input-grad (F > I),
# faster (F < I), and W longer than I.
DISAGREE = [CostModel(forward=2, backward=2, weight_grad=1, overlap=3.5),
            CostModel(forward=1, backward=2.5, weight_grad=0.5, overlap=3),
            CostModel(forward=1, backward=3, weight_grad=2, overlap=3.5)]


@pytest.mark.parametrize("costs", DISAGREE, ids=["F>I", "F<I", "W>I"])
@pytest.mark.parametrize("kind", ["dualpipe", "dualpipev"])
def test_simulate_dualpipe_bubble_is_exact_where_published_formula_is_not(kind, costs):
    for num_ranks, num_microbatches in GRID[4:12]:
        hops = num_ranks // 2 - 1 if kind == "dualpipe" else num_ranks - 1
        timeline = simulate(generate(kind, num_ranks, num_microbatches), costs)
        assert timeline.bubble == pytest.approx(_exact_dualpipe_bubble(hops, costs))
        assert timeline.bubble != pytest.approx(_published_bubble(kind, num_ranks, costs))


@pytest.mark.parametrize("costs", [CostModel(forward=1, backward=3, weight_grad=1.5),
                                   CostModel(forward=1, backward=2.5, weight_grad=2)], ids=["W>F", "W>I"])
def test_simulate_zb1p_bubble_is_exact_where_published_formula_is_not(costs):
    """ZB1P: the last rank idles (P-1)F before micro-batch 0 arrives, rank 0 idles (P-1)I waiting for its
    first I plus (P-1)max(0, F-W) in the cool-down, so bubble = (P-1) max(F+I-W, F, I); the README's
    (P-1)(F+B-2W) = (P-1)(F+I-W) needs W <= min(F, I)."""
    f, i, w = costs.forward, costs.input_grad, costs.weight_grad
    for num_ranks, num_microbatches in GRID[4:12]:
        timeline = simulate(generate("zb1p", num_ranks, num_microbatches), costs)
        assert timeline.bubble == pytest.approx((num_ranks - 1) * max(f + i - w, f, i))
        assert timeline.bubble != pytest.approx(_published_bubble("zb1p", num_ranks, costs))


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "zbv", "dualpipe", "dualpipev"])
def test_simulate_lowered_generated_schedules_equal_compute_only(kind):
    costs = CostModel(forward=1, backward=2, weight_grad=1, overlap=2.5, p2p_latency=0.3)
    for num_ranks, num_microbatches in [(2, 4), (4, 8), (4, 10)]:
        schedule = generate(kind, num_ranks, num_microbatches)
        plain, lowered = simulate(schedule, costs), simulate(insert_p2p(schedule), costs)
        assert lowered.makespan == pytest.approx(plain.makespan)
        assert lowered.peak_activations_per_rank == plain.peak_activations_per_rank
