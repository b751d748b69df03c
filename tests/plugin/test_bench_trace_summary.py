"""bench/trace_summary.py on a hand-made chrome trace: stream busy time, gaps and who they waited on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "bench" / "trace_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _kernel(name, ts, dur, corr, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"stream": stream, "correlation": corr}}


def _launch(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5,
            "args": {"correlation": corr}}


def _range(name, ts, dur):
    return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur}


def test_gaps_are_attributed_to_host_or_device_waits() -> None:
    trace = {"traceEvents": [
        _range("dualmoe/F/s0/mb0", 0, 100), _launch(10, 1),
        _kernel("gemm_a", 20, 100, 1),                           # busy 20..120
        _range("dualmoe/B/s0/mb0", 150, 500), _range("inner", 390, 20), _launch(400, 2),
        _kernel("gemm_b", 405, 50, 2),                           # 285 us gap: launched late -> host
        _launch(460, 3),
        _kernel("gemm_c", 1000, 100, 3),                         # 545 us gap: launched before it -> device
        _kernel("ncclDevKernel_SendRecv", 100, 900, 4, stream=20),
    ]}
    s = _module().summarize(trace, file="t.json")
    assert s.compute_stream == 7 and s.span_ms == pytest.approx(1.1)
    assert s.compute_busy_ms == pytest.approx(0.25)
    by_stream = {st.stream: st for st in s.streams}
    assert by_stream[20].nccl_ms == pytest.approx(0.9) and by_stream[20].busy_ms == 0
    first, second = s.gaps
    assert (first.next_kernel, first.waited_on, first.idle_ms) == ("gemm_c", "device", pytest.approx(0.545))
    assert (second.next_kernel, second.waited_on, second.launched_by) == ("gemm_b", "host", "inner")
    # gemm_b's gap waited on its launch (host) until 405; gemm_c's waited on the host 10 us, then on the device
    assert s.idle_waiting_on_host_ms == pytest.approx(0.285 + 0.010)
    assert s.idle_waiting_on_device_ms == pytest.approx(0.535)
    assert s.host_ms_by_range["dualmoe/F"] == pytest.approx(0.1)


def test_a_trace_without_kernels_is_an_error() -> None:
    with pytest.raises(ValueError, match="no CUDA kernels"):
        _module().summarize({"traceEvents": [_range("x", 0, 1)]}, file="cpu.json")
