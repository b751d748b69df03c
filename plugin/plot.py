"""PNG timeline of a simulated schedule, drawn like the figures in the DualPipe README.

One row per pipeline rank, time to the right. Each compute action is a cell coloured by its type
(F orange, B green, I yellow-green, W blue) and labelled with its micro-batch; the second direction of
DualPipe (model copy 1) and the return leg of a V schedule (stages P..2P-1) use a lighter shade of the
same colours. DualPipe labels both directions 0..m/2-1, as the README figure does. An overlapped F&B
pair is one boxed double cell: its forward part, then its backward part, under a thick black border.

matplotlib is imported when `plot_timeline` runs, so `import dualmoe` never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .schedule.ir import Action, ActionType

if TYPE_CHECKING:
    from .simulator import Timeline

__all__ = ["plot_timeline"]

# (first direction, second direction) colours per type; close to the DualPipe figure's palette.
_COLOURS = {
    ActionType.F: ("#F2A93B", "#F9D9A6"),
    ActionType.B: ("#6CC24A", "#BDE4AB"),
    ActionType.I: ("#B5D334", "#E8F09A"),
    ActionType.W: ("#5DADEC", "#BBDDF7"),
}
_NAMES = {ActionType.F: "Forward", ActionType.B: "Backward", ActionType.I: "Backward for input",
          ActionType.W: "Backward for weights"}
_CELL_IN = 0.24  # inches of the shortest compute cell
_ROW_IN = 0.42  # inches per rank row


def plot_timeline(timeline: Timeline, path: str | Path, title: str | None = None) -> Path:
    """Draw `timeline` as a PNG (see the module docstring for the conventions).

    Args:
        timeline: the result of `dualmoe.simulator.simulate`.
        path: output PNG; parent folders are created.
        title: text above the plot; defaults to the kind, P, m and makespan.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt

    schedule = timeline.schedule
    events = [e for r in range(schedule.num_ranks) for e in timeline.compute_events(r)]
    shortest = min((e.dur_us for e in events if e.dur_us > 0), default=1.0)
    width_in = min(max(timeline.makespan / shortest * _CELL_IN + 1.6, 6.0), 60.0)
    rows_in = _ROW_IN * schedule.num_ranks
    fig = plt.figure(figsize=(width_in, rows_in + 1.3), dpi=150)
    ax = fig.add_axes((1.1 / width_in, 0.85 / (rows_in + 1.3), 1 - 1.3 / width_in, rows_in / (rows_in + 1.3)))
    unit_pt = (width_in - 1.3) * 72 / (timeline.makespan / shortest)  # points per shortest cell
    for event in events:
        row = schedule.num_ranks - 1 - event.rank  # rank 0 on top
        action = Action.parse(str(event.args["action"]))
        _draw_action(ax, timeline, action, event.start_us, event.dur_us, row, unit_pt / shortest)
    _decorate(ax, timeline, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def _direction(timeline: Timeline, stage: int) -> int:
    """0 for the first direction (copy 0, or a V's outbound leg), 1 for the second."""
    schedule = timeline.schedule
    return int(schedule.num_stages == 2 * schedule.num_ranks and stage >= schedule.num_ranks)


def _label(timeline: Timeline, action: Action) -> str:
    schedule = timeline.schedule
    first = schedule.copy_of(action.microbatch) * schedule.num_microbatches // schedule.num_copies
    return str(action.microbatch - first)


def _draw_action(ax: object, timeline: Timeline, action: Action, start: float, duration: float, row: int,
                 pt_per_unit: float) -> None:
    if action.type is ActionType.FB:
        fwd, bwd = action.pair
        costs = timeline.costs
        split = duration * costs.forward / (costs.forward + costs.duration(bwd))
        _draw_cell(ax, timeline, fwd, start, split, row, pt_per_unit)
        _draw_cell(ax, timeline, bwd, start + split, duration - split, row, pt_per_unit)
        ax.add_patch(_rectangle(start, row, duration, fill=False, linewidth=2.2, edgecolor="black", zorder=3))
    else:
        _draw_cell(ax, timeline, action, start, duration, row, pt_per_unit)


def _draw_cell(ax: object, timeline: Timeline, action: Action, start: float, width: float, row: int,
               pt_per_unit: float) -> None:
    direction = _direction(timeline, action.stage)
    ax.add_patch(_rectangle(start, row, width, facecolor=_COLOURS[action.type][direction], edgecolor="#444444",
                            linewidth=0.6, zorder=2))
    text = _label(timeline, action)
    size = min(9.0, 0.9 * width * pt_per_unit / max(len(text), 1.3))
    if size >= 4.0:
        ax.text(start + width / 2, row + 0.5, text, ha="center", va="center", fontsize=size, zorder=4,
                color="black" if direction == 0 else "#333333")


def _rectangle(x: float, row: int, width: float, **style: object) -> object:
    from matplotlib.patches import Rectangle

    return Rectangle((x, row + 0.08), width, 0.84, **style)


def _decorate(ax: object, timeline: Timeline, title: str | None) -> None:
    from matplotlib.patches import Patch

    schedule = timeline.schedule
    ax.set_xlim(0, timeline.makespan)
    ax.set_ylim(0, schedule.num_ranks)
    ax.set_yticks([r + 0.5 for r in range(schedule.num_ranks)])
    ax.set_yticklabels([f"Rank {schedule.num_ranks - 1 - r}" for r in range(schedule.num_ranks)],
                       fontweight="bold")
    ax.set_xlabel("time \u2192")
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    used = {part.type for acts in schedule.actions for a in acts for part in a.computations()}
    two_way = schedule.num_stages == 2 * schedule.num_ranks
    handles = [Patch(facecolor=_COLOURS[t][0], edgecolor="#444444", label=_NAMES[t]) for t in _COLOURS if t in used]
    if two_way:
        handles.append(Patch(facecolor=_COLOURS[ActionType.F][1], edgecolor="#444444",
                             label="light: reverse direction (copy 1)" if schedule.num_copies == 2
                             else "light: return leg (stages P..2P-1)"))
    if any(a.type is ActionType.FB for acts in schedule.actions for a in acts):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.2, label="Overlapped F & B"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.42 / (_ROW_IN * schedule.num_ranks)),
              ncol=len(handles), frameon=False, fontsize=9, handlelength=2.2)
    ax.set_title(title or f"{schedule.kind}: P={schedule.num_ranks}, m={schedule.num_microbatches}, "
                 f"makespan {timeline.makespan:g}", fontsize=11)
