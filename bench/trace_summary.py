"""Where a profiled step's device time goes: busy and idle time per stream, the largest idle gaps and why.

    python bench/trace_summary.py trace_rank0.json [trace_rank1.json ...] [--gaps 12] [--json out.json]

Reads torch.profiler chrome traces (`prof.export_chrome_trace`, e.g. `bench/pipeline.py --profile-dir`).
Per trace it prints the profiled span, each CUDA stream's kernel time (NCCL kernels apart: they spin while
waiting for a peer, so their time is waiting, not work), the idle time of the busiest compute stream, and
its largest gaps. For each gap it names the kernel after it, the innermost `record_function` range
(dualmoe's "dualmoe/F/s3/mb1" actions, DeepSpeed's own) that launched it, and the launch lag: a kernel
launched long before it ran waited on the device (a stream wait on a receive), a kernel that ran as soon
as it was launched waited on the host (Python, a host sync, a blocking wait).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Gap", "StreamStats", "TraceSummary", "summarize"]


@dataclass
class StreamStats:
    """Kernel time of one CUDA stream within the profiled span."""

    stream: int
    kernels: int = 0
    busy_ms: float = 0.0
    nccl_ms: float = 0.0


@dataclass
class Gap:
    """One idle interval of the compute stream, and the kernel that ended it."""

    start_ms: float
    idle_ms: float
    next_kernel: str
    launched_by: str
    launch_lag_ms: float  # next kernel's start minus its launch call's start
    waited_on: str  # "device" (launched in the gap's first half, or before it) or "host"


@dataclass
class TraceSummary:
    """One rank's profiled step."""

    file: str
    span_ms: float
    compute_stream: int
    compute_busy_ms: float
    compute_idle_ms: float
    idle_waiting_on_host_ms: float
    idle_waiting_on_device_ms: float
    streams: list[StreamStats] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    host_ms_by_range: dict[str, float] = field(default_factory=dict)
    kernel_ms_by_name: dict[str, float] = field(default_factory=dict)
    nccl_grids: dict[str, int] = field(default_factory=dict)  # "8x1x1" -> NCCL kernels launched with that grid


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3


def _range_kind(name: str) -> str:
    """'dualmoe/F/s3/mb1' -> 'dualmoe/F'; other names as they are (their instances share one name)."""
    parts = name.split("/")
    return "/".join(parts[:2]) if parts[0] == "dualmoe" and len(parts) > 2 else name


def summarize(trace: dict[str, Any], *, file: str = "", num_gaps: int = 12, min_gap_us: float = 20.0) -> TraceSummary:
    """Summarise one chrome trace (see the module doc)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    if not kernels:
        raise ValueError(f"{file}: no CUDA kernels in the trace (was it profiled with ProfilerActivity.CUDA?)")
    t0 = min(e["ts"] for e in events)
    t1 = max(e["ts"] + e.get("dur", 0) for e in events)

    by_stream: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for k in kernels:
        by_stream[int(k["args"].get("stream", -1))].append(k)
    streams = []
    for stream, ks in sorted(by_stream.items()):
        nccl = [(k["ts"], k["ts"] + k["dur"]) for k in ks if "nccl" in k["name"].lower()]
        other = [(k["ts"], k["ts"] + k["dur"]) for k in ks if "nccl" not in k["name"].lower()]
        streams.append(StreamStats(stream, len(ks), round(_union_ms(other), 3), round(_union_ms(nccl), 3)))
    compute = max(streams, key=lambda s: s.busy_ms)
    ks = sorted((k for k in by_stream[compute.stream] if "nccl" not in k["name"].lower()), key=lambda k: k["ts"])

    starts = [r["ts"] for r in ranges]

    def innermost(ts: float) -> str:
        best = ""
        for r in ranges[:bisect.bisect_right(starts, ts)]:
            if r["ts"] <= ts <= r["ts"] + r.get("dur", 0):
                best = r["name"]  # later start = more deeply nested
        return best

    gaps, host, device, end = [], 0.0, 0.0, ks[0]["ts"] + ks[0]["dur"]
    for k in ks[1:]:
        idle = k["ts"] - end
        if idle >= min_gap_us:
            launch = launches.get(k["args"].get("correlation"))
            launch_ts = launch["ts"] if launch else k["ts"]
            # Idle until the launch call returned waited on the host; the rest waited on the device.
            launched = launch_ts + (launch.get("dur", 0) if launch else 0)
            host_part = min(max(launched - end, 0.0), idle)
            host, device = host + host_part, device + idle - host_part
            on_device = host_part < idle / 2
            gaps.append(Gap(start_ms=round((end - t0) / 1e3, 3), idle_ms=round(idle / 1e3, 3),
                            next_kernel=k["name"][:80], launched_by=innermost(launch_ts),
                            launch_lag_ms=round((k["ts"] - launch_ts) / 1e3, 3),
                            waited_on="device" if on_device else "host"))
        end = max(end, k["ts"] + k["dur"])
    gaps.sort(key=lambda g: -g.idle_ms)

    host_ms: dict[str, float] = defaultdict(float)
    for r in ranges:
        host_ms[_range_kind(r["name"])] += r.get("dur", 0) / 1e3
    top = dict(sorted(((k, round(v, 3)) for k, v in host_ms.items()), key=lambda kv: -kv[1])[:20])
    kernel_ms: dict[str, float] = defaultdict(float)
    for k in kernels:
        kernel_ms[k["name"][:90]] += k["dur"] / 1e3
    top_kernels = dict(sorted(((k, round(v, 3)) for k, v in kernel_ms.items()), key=lambda kv: -kv[1])[:num_gaps])
    grids: dict[str, int] = defaultdict(int)
    for k in kernels:
        if "nccl" in k["name"].lower():
            grids["x".join(str(v) for v in k["args"].get("grid", ()))] += 1
    span = (t1 - t0) / 1e3
    return TraceSummary(file=file, span_ms=round(span, 3), compute_stream=compute.stream,
                        compute_busy_ms=compute.busy_ms, compute_idle_ms=round(span - compute.busy_ms, 3),
                        idle_waiting_on_host_ms=round(host / 1e3, 3), idle_waiting_on_device_ms=round(device / 1e3, 3),
                        streams=streams, gaps=gaps[:num_gaps], host_ms_by_range=top,
                        kernel_ms_by_name=top_kernels, nccl_grids=dict(grids))


def _print(s: TraceSummary) -> None:
    print(f"== {s.file}: span {s.span_ms:.2f} ms; compute stream {s.compute_stream} busy {s.compute_busy_ms:.2f} ms, "
          f"idle {s.compute_idle_ms:.2f} ms (gaps >= 20 us: waiting on host {s.idle_waiting_on_host_ms:.2f}, "
          f"on device {s.idle_waiting_on_device_ms:.2f})")
    for st in s.streams:
        print(f"   stream {st.stream:>3}: {st.kernels:>5} kernels, busy {st.busy_ms:8.2f} ms, "
              f"nccl {st.nccl_ms:8.2f} ms")
    print("   largest gaps: at ms, idle ms, waited on, launch lag ms, launched by, next kernel")
    for g in s.gaps:
        print(f"   {g.start_ms:9.3f} {g.idle_ms:7.3f} {g.waited_on:>6} {g.launch_lag_ms:8.3f}  "
              f"{g.launched_by[:40]:<40} {g.next_kernel[:50]}")
    print("   NCCL kernel grids: " + ", ".join(f"{g}: {n}" for g, n in s.nccl_grids.items()))
    print("   kernel time by name (ms): " + "; ".join(f"{k} {v:.2f}" for k, v in s.kernel_ms_by_name.items()))
    print("   host time by range (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in s.host_ms_by_range.items()))


def main(argv: list[str] | None = None) -> int:
    """Summarise each trace file given; print, and write all summaries to `--json`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--gaps", type=int, default=12, help="largest gaps to list per trace")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = []
    for path in args.traces:
        with open(path) as f:
            summary = summarize(json.load(f), file=path, num_gaps=args.gaps)
        _print(summary)
        out.append(asdict(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
