"""`dualmoe schedule`: generate a pipeline schedule, simulate it, compare it with 1F1B.

Prints makespan, bubble (the worst rank's idle time), peak activations per rank and the speed-up
over 1F1B on the same ranks and micro-batches; writes a chrome trace (Perfetto) and a PNG timeline.

--costs are the times of ONE RANK'S SHARE of the model (1/P of the layers) for one micro-batch:
F forward, B full backward, W its weight-grad part (so the input-grad part is I = B - W), FB an
overlapped forward+backward pair (default F + B), P2P a latency added to each cross-rank transfer.
V schedules (zbv, dualpipev) cut that share into two half-size stages, each costing half; DualPipe
holds two full-size stages (one per model copy). So every kind is compared on the same model.
Times are in any unit; the trace reads them as microseconds.

example:
  dualmoe schedule --kind dualpipev --pp 4 --micro-batches 10 --costs F=1,B=2,W=1,FB=3 --png v.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from dualmoe.errors import ConfigError, ScheduleError
from dualmoe.launch.argtypes import int_at_least
from dualmoe.schedule import SCHEDULE_KINDS, Schedule, generate, insert_p2p
from dualmoe.simulator import CostModel, Timeline, simulate

__all__ = ["HELP", "add_arguments", "run"]

HELP = "simulate a pipeline schedule: bubble, memory, speed-up vs 1F1B; chrome trace and PNG"
BASELINE = "1f1b"


def _costs(text: str) -> CostModel:
    try:
        return CostModel.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; expected e.g. F=1,B=2,W=1,FB=3") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dualmoe schedule`."""
    parser.add_argument("--kind", required=True, choices=SCHEDULE_KINDS, help="schedule family")
    parser.add_argument("--pp", required=True, type=int_at_least(1), metavar="P", help="pipeline ranks")
    parser.add_argument("--micro-batches", required=True, type=int_at_least(1), metavar="M",
                        help="micro-batches per step")
    parser.add_argument("--costs", type=_costs, default=CostModel.parse("F=1,B=2,W=1,FB=3"), metavar="F=..,B=..",
                        help="per rank-share costs, keys F, B, W, FB, P2P (default F=1,B=2,W=1,FB=3)")
    parser.add_argument("--trace", type=Path, metavar="OUT.json", help="write a chrome/Perfetto trace")
    parser.add_argument("--png", type=Path, metavar="OUT.png", help="write a timeline picture")
    parser.add_argument("--title", help="PNG title (default: kind, P, m, costs)")
    parser.add_argument("--lowered", action="store_true",
                        help="list the actions with the SEND/RECV the engine posts (default: compute only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _flag_names(message: str) -> str:
    """Generator messages name parameters; the user typed flags."""
    return message.replace("num_microbatches", "--micro-batches").replace("num_ranks", "--pp")


def _plan(kind: str, num_ranks: int, num_microbatches: int, costs: CostModel) -> tuple[Schedule, Timeline]:
    """Generate, lower and simulate; the costs are per rank-share and scaled to the kind's stages."""
    try:
        schedule = generate(kind, num_ranks, num_microbatches)
    except ScheduleError as exc:
        raise ScheduleError(f"--kind {kind} --pp {num_ranks} --micro-batches {num_microbatches}: "
                            f"{_flag_names(str(exc))}") from None
    stage_costs = costs.scaled(num_ranks / schedule.stages_per_copy)
    return schedule, simulate(insert_p2p(schedule), stage_costs)


def _summary(args: argparse.Namespace, schedule: Schedule, timeline: Timeline, baseline: Timeline) -> dict:
    """The --json object."""
    actions = timeline.schedule.actions if args.lowered else schedule.actions
    return {
        "kind": schedule.kind, "num_ranks": schedule.num_ranks, "num_microbatches": schedule.num_microbatches,
        "num_stages": schedule.num_stages, "costs": _cost_dict(args.costs), "stage_costs": _cost_dict(timeline.costs),
        "makespan": timeline.makespan, "bubble": timeline.bubble, "bubble_fraction": timeline.bubble_fraction,
        "busy_per_rank": list(timeline.busy_per_rank), "idle_per_rank": list(timeline.idle_per_rank),
        "peak_activations_per_rank": list(timeline.peak_activations_per_rank),
        "peak_activations_per_rank_a": _peaks_in_a(schedule, timeline),
        "baseline": {"kind": BASELINE, "makespan": baseline.makespan, "bubble": baseline.bubble,
                     "peak_activations_per_rank": list(baseline.peak_activations_per_rank)},
        "speedup_vs_1f1b": baseline.makespan / timeline.makespan,
        "actions_per_rank": [[str(a) for a in acts] for acts in actions],
        "trace": None if args.trace is None else str(args.trace),
        "png": None if args.png is None else str(args.png),
    }


def _peaks_in_a(schedule: Schedule, timeline: Timeline) -> list[float]:
    """Peak activations in a = one rank's share (1/P of the model) of one micro-batch's activations."""
    return [peak * schedule.num_ranks / schedule.stages_per_copy for peak in timeline.peak_activations_per_rank]


def _cost_dict(costs: CostModel) -> dict[str, float]:
    return {"F": costs.forward, "B": costs.backward, "W": costs.weight_grad, "I": costs.input_grad,
            "FB": costs.forward_backward, "P2P": costs.p2p_latency}


def _table(args: argparse.Namespace, schedule: Schedule, timeline: Timeline, baseline: Timeline) -> str:
    """The human-readable report."""
    num_ranks, makespan = schedule.num_ranks, timeline.makespan
    lines = [f"{schedule.kind}: P={num_ranks} ranks, m={schedule.num_microbatches} micro-batches, "
             f"{schedule.num_stages} stages",
             f"  costs per rank share (1/{num_ranks} of the model): {args.costs}",
             f"  costs per stage:                       {timeline.costs}", "",
             f"  makespan          {makespan:g}",
             f"  bubble            {timeline.bubble:g}  ({100 * timeline.bubble_fraction:.1f}% of the step: "
             "the worst rank's idle time)",
             f"  speed-up vs 1f1b  {baseline.makespan / makespan:.3f}x  (1f1b: makespan {baseline.makespan:g}, "
             f"bubble {baseline.bubble:g})", "",
             "  rank     busy     idle  idle %   peak act. (stages)   peak act. (a)"]
    for rank, peak_a in enumerate(_peaks_in_a(schedule, timeline)):
        busy, idle = timeline.busy_per_rank[rank], timeline.idle_per_rank[rank]
        lines.append(f"  {rank:4d} {busy:8g} {idle:8g} {100 * idle / makespan:6.1f}%   "
                     f"{timeline.peak_activations_per_rank[rank]:>18d}   {peak_a:>13g}")
    lines += ["", "  peak act.: live activations of one stage for one micro-batch, counted from F's start to the end",
              "  of its B (or W); a = one rank's share (1/P of the model) of one micro-batch's activations."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Simulate `args.kind` and its 1F1B baseline; print a table or JSON; write the trace/PNG if asked."""
    schedule, timeline = _plan(args.kind, args.pp, args.micro_batches, args.costs)
    baseline = timeline if args.kind == BASELINE else _plan(BASELINE, args.pp, args.micro_batches, args.costs)[1]
    if args.trace is not None:
        from dualmoe.tracing import write_chrome_trace

        _write(args.trace, "--trace", lambda: write_chrome_trace(timeline.events, args.trace))
    if args.png is not None:
        from dualmoe.plot import plot_timeline

        title = args.title or (f"{schedule.kind}: P={schedule.num_ranks}, m={schedule.num_microbatches}, "
                               f"costs {args.costs} (per rank share), makespan {timeline.makespan:g}")
        _write(args.png, "--png", lambda: plot_timeline(timeline, args.png, title))
    if args.json:
        print(json.dumps(_summary(args, schedule, timeline, baseline)))
    else:
        print(_table(args, schedule, timeline, baseline))
    return 0


def _write(path: Path, flag: str, write: Callable[[], object]) -> None:
    try:
        write()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
