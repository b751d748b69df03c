"""bench/moe.py --tiny runs on CPU for all three implementations and prints one JSON line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_moe_tiny_cpu_reports_every_implementation() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "moe.py"), "--tiny", "--json", "--warmup", "1",
                          "--iters", "1"], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in rows] == ["dualmoe", "deepspeed", "hf"]
    for row in rows:
        assert row["tokens_per_s_per_rank"] > 0 and row["hidden"] == 64 and row["device"] == "cpu"
    assert rows[0]["boundary_ms_per_step"] >= 0
