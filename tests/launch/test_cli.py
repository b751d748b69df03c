"""Tests of the `dualmoe` command line: `dualmoe schedule` in-process and once as the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dualmoe.launch.cli import COMMANDS, main
from dualmoe.schedule import Action


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_schedule_table_reports_makespan_bubble_peaks_and_speedup(capsys):
    code, out, _ = _run(capsys, "schedule", "--kind", "dualpipev", "--pp", "4", "--micro-batches", "10",
                        "--costs", "F=1,B=2,W=1,FB=3")
    assert code == 0
    # Half-size stages: F=0.5, B=1, W=0.5 per stage; bubble (P-1)(fb+b-3w) = 3; 1F1B: 10*3 + 3*3 = 39.
    assert "costs per stage:                       F=0.5,B=1,W=0.5,FB=1.5" in out
    assert "makespan          33\n" in out
    assert "bubble            3  (9.1% of the step" in out
    assert "speed-up vs 1f1b  1.182x  (1f1b: makespan 39, bubble 9)" in out
    assert "     0       30        3    9.1%                    9             4.5" in out


def test_cli_schedule_json_has_the_documented_keys(capsys):
    code, out, _ = _run(capsys, "schedule", "--kind", "dualpipe", "--pp", "4", "--micro-batches", "8",
                        "--costs", "F=1,B=2,W=1,FB=2.5", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["makespan"] == 24.0
    assert report["busy_per_rank"] == [22.5] * 4  # 3 F&B pairs save 0.5 each: 24 - 1.5
    assert report["bubble"] == 1.5  # (P/2-1)(F&B+B-3W) = 1 * 1.5
    assert report["idle_per_rank"] == [1.5, 1.5, 1.5, 1.5]
    assert report["peak_activations_per_rank"] == [5, 5, 5, 5]  # P + 1
    assert report["speedup_vs_1f1b"] == pytest.approx(33 / 24)
    assert len(report["actions_per_rank"]) == 4
    assert all(isinstance(Action.parse(text), Action) for acts in report["actions_per_rank"] for text in acts)
    assert not any("SEND" in text for acts in report["actions_per_rank"] for text in acts)


def test_cli_schedule_lowered_lists_p2p(capsys):
    code, out, _ = _run(capsys, "schedule", "--kind", "1f1b", "--pp", "2", "--micro-batches", "2", "--json",
                        "--lowered")
    assert code == 0
    assert json.loads(out)["actions_per_rank"][0] == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0",
                                                      "0RECV_B1", "0B1"]


def test_cli_schedule_writes_trace_and_png(capsys, tmp_path):
    trace, png = tmp_path / "t.json", tmp_path / "t.png"
    code, out, _ = _run(capsys, "schedule", "--kind", "zb1p", "--pp", "2", "--micro-batches", "4", "--json",
                        "--trace", str(trace), "--png", str(png))
    assert code == 0
    assert json.loads(out)["trace"] == str(trace)
    spans = [r for r in json.loads(trace.read_text())["traceEvents"] if r["ph"] == "X"]
    assert {r["pid"] for r in spans} == {0, 1}
    assert "dualmoe/I/s1/mb0" in {r["name"] for r in spans}
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(("argv", "message"), [
    (["--kind", "dualpipe", "--pp", "3", "--micro-batches", "6"],
     r"--kind dualpipe --pp 3 --micro-batches 6: dualpipe: --pp=3 must be an even number >= 2"),
    (["--kind", "dualpipev", "--pp", "4", "--micro-batches", "7"],
     r"dualpipev: --micro-batches=7 must be >= 2 x --pp \(8\)"),
    (["--kind", "gpipe", "--pp", "4", "--micro-batches", "8"],
     r"argument --kind: invalid choice: 'gpipe' \(choose from '1f1b', 'zb1p', 'zbv', 'dualpipe', 'dualpipev'\)"),
    (["--kind", "1f1b", "--pp", "0", "--micro-batches", "8"], r"argument --pp: '0' is not an integer >= 1"),
    (["--kind", "1f1b", "--pp", "4", "--micro-batches", "8", "--costs", "F=1,B=x"],
     r"argument --costs: 'F=1,B=x': cost B='x' is not a number; expected e.g. F=1,B=2,W=1,FB=3"),
    (["--kind", "1f1b", "--pp", "4", "--micro-batches", "8", "--costs", "F=1,B=2,W=2"],
     r"argument --costs: 'F=1,B=2,W=2': W=2 must be < B=2"),
    (["--kind", "1f1b", "--pp", "4", "--micro-batches", "8", "--costs", "F=1,B=2,G=1"],
     r"KEY one of F, B, W, FB, P2P"),
])
def test_cli_schedule_bad_input_exits_2_naming_flag_and_value(capsys, argv, message):
    code, out, err = _run(capsys, "schedule", *argv)
    assert code == 2
    assert out == ""
    assert err.splitlines()[-1].startswith("dualmoe schedule: error: ")
    assert re.search(message, err), err


def test_cli_schedule_unwritable_output_exits_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _run(capsys, "schedule", "--kind", "1f1b", "--pp", "2", "--micro-batches", "2",
                        "--trace", str(blocker / "t.json"))
    assert code == 2
    assert f"--trace {blocker / 't.json'}: cannot write" in err


def test_cli_help_lists_registered_commands(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert all(name in out for name in COMMANDS)
    assert _run(capsys)[0] == 2  # a command is required


def test_cli_console_script_runs_schedule():
    script = Path(sys.executable).with_name("dualmoe")
    result = subprocess.run([str(script), "schedule", "--kind", "1f1b", "--pp", "2", "--micro-batches", "4",
                             "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["makespan"] == 15.0  # (m + P - 1)(F + B)
