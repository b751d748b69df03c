"""The MoE benchmarks' CPU smoke modes: bench/moe.py --tiny for all three implementations, and bench/rebalance.py
--tiny under torchrun with its per-phase breakdown (one JSON line each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _json_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_bench_moe_tiny_cpu_reports_every_implementation() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "moe.py"), "--tiny", "--json", "--warmup", "1",
                          "--iters", "1"], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=True)
    rows = _json_rows(out.stdout)
    assert [r["impl"] for r in rows] == ["dualmoe", "deepspeed", "hf"]
    for row in rows:
        assert row["tokens_per_s_per_rank"] > 0 and row["hidden"] == 64 and row["device"] == "cpu"
    assert rows[0]["boundary_ms_per_step"] >= 0 and rows[0]["replica_rows"] == 0
    assert rows[0]["grouped_mm_fallbacks"] == {}


@pytest.mark.dist
def test_bench_rebalance_tiny_reports_phases_and_rows_of_every_rank() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "bench" / "rebalance.py"), "--tiny", "--json", "--steps", "2", "--warmup", "1"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=True)
    (row,) = _json_rows(out.stdout)
    assert row["shared"] == 1 and row["grouped_mm_fallbacks"] == {}
    for phase in (row["without"], row["with"]):
        assert len(phase["rows_per_rank"]) == 2 and all(r > 0 for r in phase["rows_per_rank"])
        assert phase["rows_max_over_mean"] >= 1.0 and len(phase["replica_rows_per_rank"]) == 2
        names = set(phase["phases"])
        assert {"router", "dispatch_a2a", "experts", "combine_a2a", "shared", "backward_combine", "backward_experts",
                "backward_dispatch_router", "boundary_reduce_slot_grads", "boundary_end_step"} <= names, names
        for timing in phase["phases"].values():
            assert len(timing["per_rank_ms"]) == 2 and timing["max_ms"] >= timing["mean_ms"] >= 0
