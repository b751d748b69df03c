"""Tests of the trace events, the chrome-trace JSON they are written to, and the PNG timeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dualmoe.schedule import Action, generate, insert_p2p
from dualmoe.simulator import CostModel, simulate
from dualmoe.tracing import TraceEvent, action_event_name, read_chrome_trace, write_chrome_trace

COSTS = CostModel(forward=1, backward=2, weight_grad=1, overlap=2.5, p2p_latency=0.25)


def test_action_event_name_is_the_record_function_name():
    assert action_event_name(Action.parse("3F1")) == "dualmoe/F/s3/mb1"
    assert action_event_name(Action.parse("2W0")) == "dualmoe/W/s2/mb0"
    assert action_event_name(Action.parse("0F5&3B1")) == "dualmoe/FB/s0/mb5+s3/mb1"
    assert action_event_name(Action.parse("1SEND_F2")) == "dualmoe/SEND_F/s1/mb2"


def test_trace_event_rejects_negative_duration_and_empty_names():
    with pytest.raises(ValueError, match=r"dur_us=-1.0 must be finite with dur_us >= 0"):
        TraceEvent(rank=0, stream="compute", name="x", start_us=0.0, dur_us=-1.0)
    with pytest.raises(ValueError, match=r"non-empty stream and name"):
        TraceEvent(rank=0, stream="", name="x", start_us=0.0, dur_us=1.0)


def test_write_chrome_trace_layout(tmp_path):
    events = [TraceEvent(rank=1, stream="recv", name="dualmoe/RECV_F/s1/mb0", start_us=1.0, dur_us=0.5),
              TraceEvent(rank=1, stream="compute", name="dualmoe/F/s1/mb0", start_us=1.5, dur_us=1.0,
                         args={"action": "1F0", "stage": 1}),
              TraceEvent(rank=0, stream="compute", name="dualmoe/F/s0/mb0", start_us=0.0, dur_us=1.0)]
    path = write_chrome_trace(events, tmp_path / "sub" / "trace.json")
    records = json.loads(path.read_text())["traceEvents"]
    threads = {(r["pid"], r["tid"]): r["args"]["name"] for r in records if r["name"] == "thread_name"}
    assert threads == {(0, 0): "compute", (1, 0): "compute", (1, 1): "recv"}  # compute is always tid 0
    assert {r["pid"]: r["args"]["name"] for r in records if r["name"] == "process_name"} == {0: "rank 0", 1: "rank 1"}
    spans = [r for r in records if r["ph"] == "X"]
    assert [r["name"] for r in spans] == ["dualmoe/F/s0/mb0", "dualmoe/RECV_F/s1/mb0", "dualmoe/F/s1/mb0"]
    assert spans[2] == {"ph": "X", "name": "dualmoe/F/s1/mb0", "pid": 1, "tid": 0, "ts": 1.5, "dur": 1.0,
                        "cat": "F", "args": {"action": "1F0", "stage": 1}}


def test_simulated_timeline_round_trips_through_chrome_trace(tmp_path):
    schedule = insert_p2p(generate("dualpipev", 2, 4))
    timeline = simulate(schedule, COSTS)
    path = write_chrome_trace(timeline.events, tmp_path / "trace.json")
    back = read_chrome_trace(path)
    assert sorted(back, key=repr) == sorted(timeline.events, key=repr)
    compute = [e for e in back if e.stream == "compute"]
    assert len(compute) == sum(a.is_compute for acts in schedule.actions for a in acts)
    assert {e.stream for e in back} == {"compute", "send", "recv"}
    assert all(Action.parse(str(e.args["action"])) is not None for e in compute)


def test_plot_timeline_writes_a_png(tmp_path):
    from dualmoe.plot import plot_timeline

    timeline = simulate(generate("dualpipe", 4, 8), COSTS)
    path = plot_timeline(timeline, tmp_path / "img" / "dualpipe.png", title="DualPipe P=4 m=8")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_pure_modules_import_neither_torch_nor_matplotlib():
    code = ("import sys, dualmoe, dualmoe.simulator, dualmoe.tracing, dualmoe.plot; "
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
