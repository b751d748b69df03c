"""`dualmoe plan`: balancedness before/after, copies and plan time from a load file; JSON, PNG heatmap,
the placement round trip through --out/--current, and errors that name the flag."""

from __future__ import annotations

import json
import re

import pytest
import torch
from dualmoe.launch.cli import COMMANDS, main
from dualmoe.moe.checkpoint import save_load_stats
from dualmoe.moe.eplb import balancedness
from dualmoe.moe.placement import Placement

LAYERS, EXPERTS, GPUS, SLOTS = 3, 16, 4, 20


def _zipf_load(seed: int = 0, s: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** -s
    rows = [torch.multinomial(popularity[torch.randperm(EXPERTS, generator=gen)], 4000, replacement=True,
                              generator=gen).bincount(minlength=EXPERTS).double() for _ in range(LAYERS)]
    return torch.stack(rows)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_cmd_is_registered() -> None:
    assert COMMANDS["plan"] == "dualmoe.launch.plan_cmd"


def test_plan_cmd_table_reports_balancedness_copies_and_time(capsys, tmp_path) -> None:
    stats = save_load_stats(tmp_path / "load.pt", _zipf_load())
    code, out, _ = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), "--slots", str(SLOTS))
    assert code == 0
    assert f"load: {LAYERS} layers x {EXPERTS} experts" in out
    assert f"placement: {SLOTS} slots on {GPUS} GPUs (5 per GPU), 1 nodes, 1 groups -> global policy" in out
    assert "current: identity (training start)" in out
    assert "balancedness  before 0." in out and "copies  " in out and "plan time" in out


def test_plan_cmd_json_matches_an_independent_balancedness(capsys, tmp_path) -> None:
    load = _zipf_load()
    stats = save_load_stats(tmp_path / "load.json", load)
    out_file = tmp_path / "new.pt"
    code, out, _ = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), "--slots", str(SLOTS), "--json",
                        "--out", str(out_file))
    assert code == 0
    report = json.loads(out)
    identity = torch.tensor([Placement.identity(EXPERTS, SLOTS, num_ranks=GPUS).physical_to_logical] * LAYERS)
    per_layer = balancedness(identity, load, GPUS)
    assert report["worst_layer_before"] == pytest.approx(float(per_layer.min()))
    assert report["balancedness_after"] > report["balancedness_before"]
    assert 0 < report["copies"] <= LAYERS * SLOTS and report["plan_ms"] > 0
    new = torch.load(out_file, weights_only=False)["placement"]
    assert int((new != identity).sum()) == report["copies"]
    # Planning again from the new placement: it starts where the last plan ended.
    code, out, _ = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), "--slots", str(SLOTS), "--json",
                        "--current", str(out_file), "--min-gain", "0.5")
    again = json.loads(out)
    assert again["balancedness_before"] == pytest.approx(report["balancedness_after"])
    assert again["copies"] == 0 and again["layers_changed"] == 0  # skip rule: nothing gains 0.5


def test_plan_cmd_uses_the_placement_recorded_in_the_stats_and_respects_max_moves(capsys, tmp_path) -> None:
    load = _zipf_load(seed=1)
    recorded = torch.tensor([Placement.identity(EXPERTS, SLOTS, num_ranks=GPUS).physical_to_logical] * LAYERS)
    stats = save_load_stats(tmp_path / "dump.pt", load, placement_LS=recorded.flip(-1), num_ranks=GPUS)
    code, out, _ = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), "--slots", str(SLOTS), "--json",
                        "--max-moves", "2")
    report = json.loads(out)
    assert code == 0 and report["current"].startswith("recorded in")
    assert report["copies"] <= 2 * LAYERS


def test_plan_cmd_draws_the_heatmap(capsys, tmp_path) -> None:
    stats = save_load_stats(tmp_path / "load.pt", _zipf_load())
    png = tmp_path / "sub" / "plan.png"
    code, _, _ = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), "--slots", str(SLOTS), "--nodes", "2",
                      "--groups", "4", "--png", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["--slots", "18"], r"--slots=18: must be a multiple of --gpus \(4\)"),
    (["--slots", "12"], r"--slots=12: must be >= the number of logical experts \(16\)"),
    (["--slots", "20", "--current", "BAD"], r"--current .*placement has shape \(1, 3\)"),
    (["--slots", "0"], r"argument --slots: '0' is not an integer >= 1"),
])
def test_plan_cmd_errors_name_the_flag(capsys, tmp_path, argv: list[str], message: str) -> None:
    stats = save_load_stats(tmp_path / "load.pt", _zipf_load())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[0, 1, 2]]))
    argv = [str(bad) if a == "BAD" else a for a in argv]
    code, _, err = _run(capsys, "--stats", str(stats), "--gpus", str(GPUS), *argv)
    assert code == 2
    assert re.search(message, err), err


def test_plan_cmd_rejects_a_missing_stats_file(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, "--stats", str(tmp_path / "none.pt"), "--gpus", "2", "--slots", "4")
    assert code == 2 and "does not exist" in err
