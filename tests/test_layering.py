"""The plan layer stays pure: no torch.distributed or deepspeed, and the schedule tools need no torch at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Pure planning modules (STYLE.md "Module boundaries"): they take and return plain data.
PLAN_FILES = ["plugin/config.py", "plugin/simulator.py", "plugin/tracing.py", "moe/config.py", "moe/placement.py",
              "moe/eplb.py", "moe/eplb_pack.py", "moe/eplb_search.py", "moe/eplb_migrate.py", "moe/eplb_sticky.py",
              "moe/eplb_home.py", "moe/rebalance_plan.py",
              *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plugin" / "schedule").glob("*.py"))]


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("relpath", PLAN_FILES)
def test_layering_plan_module_imports_no_distributed_code(relpath: str) -> None:
    bad = {n for n in _imported_names(ROOT / relpath)
           if n.startswith(("torch.distributed", "deepspeed", "dualmoe.engine", "dualmoe.p2p", "dualmoe.moe.dispatch"))}
    assert not bad, f"{relpath} imports {sorted(bad)}"


def test_layering_schedule_tools_load_without_torch_or_deepspeed() -> None:
    code = ("import sys; import dualmoe, dualmoe.schedule, dualmoe.simulator, dualmoe.tracing, dualmoe.config, "
            "dualmoe.moe.config, dualmoe.moe.placement; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
