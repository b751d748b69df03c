"""Trace events and their chrome-trace (Perfetto) JSON form, shared by the simulator and the engine.

One event is one interval on one stream of one pipeline rank. The simulator predicts them, the runtime
engine measures them (each scheduled action runs under `record_function(event.name)`), and both are
written by `write_chrome_trace`, so predicted and measured timelines open side by side in Perfetto or
chrome://tracing:

    {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "rank 0"}},
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": 0, "args": {"name": "compute"}},
        {"ph": "X", "name": "dualmoe/F/s3/mb1", "pid": 0, "tid": 0, "ts": 12.0, "dur": 1.0,
         "cat": "F", "args": {"action": "3F1", "stage": 3, "microbatch": 1}},
        ...],
     "displayTimeUnit": "ms"}

pid = pipeline rank, tid = stream (named by a thread_name record; "compute" is always tid 0),
ts/dur in microseconds. Action names follow `action_event_name`: "dualmoe/<type>/s<stage>/mb<mb>",
and for an overlapped pair "dualmoe/FB/s0/mb5+s3/mb1" (forward part first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .schedule.ir import Action, ActionType

__all__ = ["COMPUTE_STREAM", "TraceEvent", "action_event_name", "read_chrome_trace", "write_chrome_trace"]

COMPUTE_STREAM = "compute"

ArgValue = str | int | float | bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceEvent:
    """One interval on one stream of one rank.

    Args:
        rank: pipeline rank (the trace's pid).
        stream: stream name, e.g. "compute", "send", "recv", "a2a" (the trace's tid, named).
        name: stable event name, e.g. "dualmoe/F/s3/mb1" (see `action_event_name`).
        start_us: start time in microseconds from the step's start.
        dur_us: duration in microseconds (>= 0).
        args: extra key/value pairs shown by the trace viewer (the action text, stage, micro-batch...).
    """

    rank: int
    stream: str
    name: str
    start_us: float
    dur_us: float
    args: Mapping[str, ArgValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"TraceEvent.rank={self.rank} must be >= 0")
        if not self.stream or not self.name:
            raise ValueError(f"TraceEvent needs a non-empty stream and name, got {self.stream!r}, {self.name!r}")
        if not (math.isfinite(self.start_us) and math.isfinite(self.dur_us)) or self.dur_us < 0:
            raise ValueError(f"TraceEvent {self.name}: start_us={self.start_us}, dur_us={self.dur_us} must be "
                             "finite with dur_us >= 0")

    @property
    def end_us(self) -> float:
        """Start plus duration, in microseconds."""
        return self.start_us + self.dur_us


def action_event_name(action: Action) -> str:
    """Stable record_function / trace name of a scheduled action, e.g. "dualmoe/F/s3/mb1".

    An overlapped pair is named "dualmoe/FB/s<f-stage>/mb<f-mb>+s<b-stage>/mb<b-mb>"; its backward's
    type (B or I) is in the args written by the simulator.
    """
    if action.type is ActionType.FB:
        fwd, bwd = action.pair
        return f"dualmoe/FB/s{fwd.stage}/mb{fwd.microbatch}+s{bwd.stage}/mb{bwd.microbatch}"
    return f"dualmoe/{action.type.value}/s{action.stage}/mb{action.microbatch}"


def _stream_ids(events: list[TraceEvent]) -> dict[tuple[int, str], int]:
    """tid per (rank, stream): "compute" is 0, other streams follow in order of first appearance."""
    ids: dict[tuple[int, str], int] = {}
    count: dict[int, int] = {}
    for event in sorted(events, key=lambda e: e.stream != COMPUTE_STREAM):  # stable: keeps appearance order
        key = (event.rank, event.stream)
        if key not in ids:
            ids[key] = count.get(event.rank, 0)
            count[event.rank] = ids[key] + 1
    return ids


def write_chrome_trace(events: Iterable[TraceEvent], path: str | Path) -> Path:
    """Write events as chrome-trace JSON ("X" events; pid = rank, tid = stream, microseconds).

    Args:
        events: the events of any number of ranks and streams, in any order.
        path: output file; parent folders are created.

    Returns:
        The path written.
    """
    events = sorted(events, key=lambda e: (e.rank, e.start_us, e.stream))
    tids = _stream_ids(events)
    records: list[dict[str, object]] = []
    for rank in sorted({e.rank for e in events}):
        records.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
        records.append({"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}})
    for (rank, stream), tid in sorted(tids.items()):
        records.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": stream}})
    for event in events:
        records.append({
            "ph": "X", "name": event.name, "pid": event.rank, "tid": tids[(event.rank, event.stream)],
            "ts": event.start_us, "dur": event.dur_us, "cat": event.name.split("/")[1] if "/" in event.name else "",
            "args": dict(event.args),
        })
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One record per line: small diffs, and still one JSON object Perfetto and chrome://tracing open.
    body = ",\n".join(json.dumps(record) for record in records)
    out.write_text(f'{{"displayTimeUnit": "ms", "traceEvents": [\n{body}\n]}}\n')
    return out


def read_chrome_trace(path: str | Path) -> list[TraceEvent]:
    """Read the "X" events of a chrome-trace JSON back (stream names from its thread_name records).

    Accepts both `{"traceEvents": [...]}` and a bare list; events of unnamed threads get the tid as stream.
    """
    data = json.loads(Path(path).read_text())
    records = data["traceEvents"] if isinstance(data, dict) else data
    names = {(r["pid"], r["tid"]): r["args"]["name"] for r in records
             if r.get("ph") == "M" and r.get("name") == "thread_name"}
    return [TraceEvent(rank=int(r["pid"]), stream=str(names.get((r["pid"], r["tid"]), r["tid"])),
                       name=r["name"], start_us=float(r["ts"]), dur_us=float(r.get("dur", 0.0)),
                       args=dict(r.get("args", {})))
            for r in records if r.get("ph") == "X"]
