"""EPLB rebalancer: transfer planning and chunking (pure), and migration on gloo at EP=4 and EP=2 x DP=2:
the model function and the training losses do not change, optimizer state never moves, and a failure on
one rank (while packing, unpacking, or a rank late to the vote) leaves the old placement on every rank."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dualmoe.errors import ConfigError, PlacementError
from dualmoe.moe.config import EplbConfig
from dualmoe.moe.hooks import end_step, reduce_slot_grads
from dualmoe.moe.layer import MoELayer
from dualmoe.moe.placement import Placement
from dualmoe.moe.rebalance import Rebalancer, SlotCopy, chunk_copies, plan_copies, plan_digest
from dualmoe.moe.stats import LoadStats
from torch import nn

from tests.harness import run_ranks
from tests.moe._common import FFN, HIDDEN, ep_groups, moe_config

ROOT = Path(__file__).resolve().parents[2]


# ---- pure: which rank sends which slot to whom, and in which round ----------------------------------------
def test_plan_copies_sends_each_changed_slot_from_the_experts_home() -> None:
    # E=4, P=2: experts 0,1 live on rank 0, experts 2,3 on rank 1; S=6, three slots per rank.
    old = [[0, 1, 2, 2, 3, 0], [0, 1, 2, 3, 3, 2]]
    new = [[0, 1, 3, 2, 3, 1], [0, 1, 2, 3, 3, 2]]
    copies = plan_copies(old, new, num_experts=4, num_ranks=2)
    assert copies == (SlotCopy(layer=0, slot=2, expert=3, src_rank=1, dst_rank=0),
                      SlotCopy(layer=0, slot=5, expert=1, src_rank=0, dst_rank=1))
    assert plan_copies(new, new, num_experts=4, num_ranks=2) == ()


def test_plan_copies_rejects_mismatched_maps() -> None:
    with pytest.raises(PlacementError, match=r"\[L, S\]"):
        plan_copies([[0, 1]], [[0, 1, 1]], num_experts=2, num_ranks=1)
    with pytest.raises(PlacementError, match="divisible by the EP size 2"):
        plan_copies([[0, 1, 2]], [[0, 1, 2]], num_experts=3, num_ranks=2)


def _random_copies(rng: random.Random, num_ranks: int, num_layers: int) -> list[SlotCopy]:
    copies = []
    for layer in range(num_layers):
        for slot in range(num_ranks * 4):
            if rng.random() < 0.5:
                copies.append(SlotCopy(layer=layer, slot=slot, expert=rng.randrange(8),
                                       src_rank=rng.randrange(num_ranks), dst_rank=slot // 4))
    return copies


@pytest.mark.parametrize("seed", range(12))
def test_chunk_copies_bounds_bytes_per_rank_and_round(seed: int) -> None:
    rng = random.Random(seed)
    num_ranks, num_layers = rng.choice([2, 4, 8]), rng.randint(1, 4)
    copy_bytes = [rng.choice([100, 250, 400]) for _ in range(num_layers)]
    chunk = rng.choice([399, 400, 1000, 5000])
    copies = _random_copies(rng, num_ranks, num_layers)
    rounds = chunk_copies(copies, copy_bytes=copy_bytes, chunk_bytes=chunk, num_ranks=num_ranks)
    flat = [c for r in rounds for c in r]
    assert sorted(flat, key=copies.index) == copies and len(flat) == len(copies)  # each copy exactly once
    for index, copies_r in enumerate(rounds):
        assert [copies.index(c) for c in copies_r] == sorted(copies.index(c) for c in copies_r)  # input order
        remote = [c for c in copies_r if not c.is_local]
        assert index == 0 or len(remote) == len(copies_r)  # local copies only in round 0
        for rank in range(num_ranks):
            for side in ("src_rank", "dst_rank"):
                mine = [copy_bytes[c.layer] for c in remote if getattr(c, side) == rank]
                assert sum(mine) <= chunk or len(mine) == 1, (index, rank, side, mine)
    assert rounds == chunk_copies(copies, copy_bytes=copy_bytes, chunk_bytes=chunk, num_ranks=num_ranks)


def test_chunk_copies_gives_an_oversized_copy_its_own_round_and_rejects_zero() -> None:
    copies = [SlotCopy(layer=0, slot=s, expert=0, src_rank=0, dst_rank=1) for s in range(3)]
    rounds = chunk_copies(copies, copy_bytes=[10], chunk_bytes=4, num_ranks=2)
    assert [len(r) for r in rounds] == [1, 1, 1]
    assert len(chunk_copies(copies, copy_bytes=[10], chunk_bytes=20, num_ranks=2)) == 2
    assert chunk_copies([], copy_bytes=[10], chunk_bytes=20, num_ranks=2) == ()
    with pytest.raises(ConfigError, match="chunk_bytes=0"):
        chunk_copies(copies, copy_bytes=[10], chunk_bytes=0, num_ranks=2)


@pytest.mark.parametrize("seed", range(6))
def test_plan_copies_and_rounds_rebuild_the_new_slots_from_homes(seed: int) -> None:
    """Simulate P ranks with plain tensors: apply the rounds; every slot ends with its new expert's weights."""
    gen = torch.Generator().manual_seed(seed)
    num_ranks, num_experts, num_slots, num_layers = 4, 8, 12, 3
    weights_LE = torch.randn(num_layers, num_experts, 5, generator=gen)  # logical expert weights
    old = torch.stack([torch.randperm(num_slots, generator=gen) % num_experts for _ in range(num_layers)])
    new = torch.stack([torch.randperm(num_slots, generator=gen) % num_experts for _ in range(num_layers)])
    slots = [weights_LE[layer][old[layer]].clone() for layer in range(num_layers)]  # slots hold the old experts
    copies = plan_copies(old, new, num_experts=num_experts, num_ranks=num_ranks)
    rounds = chunk_copies(copies, copy_bytes=[20] * num_layers, chunk_bytes=40, num_ranks=num_ranks)
    per_home = num_experts // num_ranks
    for copies_r in rounds:
        for c in copies_r:
            home_rows = weights_LE[c.layer][c.src_rank * per_home:(c.src_rank + 1) * per_home]  # src rank's homes
            slots[c.layer][c.slot] = home_rows[c.expert - c.src_rank * per_home]
    for layer in range(num_layers):
        assert torch.equal(slots[layer], weights_LE[layer][new[layer]])


def test_plan_digest_tells_maps_apart() -> None:
    a = torch.tensor([[0, 1, 2, 3]])
    assert plan_digest(a) == plan_digest(a.clone()) and plan_digest(a) != plan_digest(a.flip(-1))
    assert 0 <= plan_digest(a) < 2**63


# ---- one process (no torch.distributed) -------------------------------------------------------------------
def _skewed_layer(cfg, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, seed=seed)
    with torch.no_grad():  # expert 0 hottest: selection follows the bias (rate 0 keeps it)
        layer.gate.e_score_correction_bias.copy_(torch.linspace(0.6, -0.6, cfg.num_experts))
    return layer


def test_rebalancer_step_follows_interval_and_skips_a_plan_without_copies() -> None:
    layer = _skewed_layer(moe_config(r=4, rate=0.0))
    stats = LoadStats([layer], window=2)
    rebalancer = Rebalancer([layer], stats=stats, config=EplbConfig(enabled=True, interval=3))
    assert rebalancer.step(3) is None  # no statistics yet
    layer(torch.randn(32, HIDDEN))
    stats.step()
    assert rebalancer.step(1) is None and rebalancer.step(2) is None
    report = rebalancer.step(3)
    assert report is not None and not report.applied and report.status.startswith("skipped")  # one rank: balanced
    assert rebalancer.num_skipped == 1 and rebalancer.stall_s >= report.plan_s > 0
    off = Rebalancer([layer], stats=stats, config=EplbConfig(enabled=False, interval=1))
    assert off.step(5) is None


def test_auto_remote_cost_prices_a_remote_slot_by_rows_per_rank_and_step() -> None:
    layer = _skewed_layer(moe_config(r=4, rate=0.0))
    num_slots = layer.placement.num_slots
    stats = LoadStats([layer], window=4)
    fixed = Rebalancer([layer], stats=stats, config=EplbConfig(remote_cost=0.3))
    auto = Rebalancer([layer], stats=stats, config=EplbConfig(remote_cost="auto", remote_slot_rows=100.0))
    for _ in range(6):  # the window holds the last 4 steps
        layer(torch.randn(32, HIDDEN))
        stats.step()
    load = auto.planning_load()
    rows = float(load.sum()) / 4  # one EP rank: rows per step
    assert rows == 32 * layer.config.top_k
    assert fixed.remote_price(load) == 0.3
    assert auto.remote_price(load) == pytest.approx(num_slots * 100.0 / rows)
    assert auto.remote_price(2 * load) == pytest.approx(num_slots * 100.0 / rows / 2)  # more rows: cheaper
    assert auto.remote_price(torch.zeros_like(load)) == 0.0
    auto.plan()
    assert auto.last_remote_cost == pytest.approx(num_slots * 100.0 / rows)
    ema = Rebalancer([layer], stats=stats, config=EplbConfig(remote_cost="auto", ema=0.5, remote_slot_rows=100.0))
    assert ema.remote_price(stats.ema_LE.cpu()) == pytest.approx(num_slots * 100.0 / rows)  # the EMA is per step
    with pytest.raises(ConfigError, match="remote_cost='cheap': must be a number >= 0 or \"auto\""):
        Rebalancer([layer], stats=stats, remote_cost="cheap")


def test_rebalancer_rejects_layers_of_different_shapes() -> None:
    a = MoELayer(moe_config(r=0), hidden_size=HIDDEN, ffn_hidden_size=FFN)
    b = MoELayer(moe_config(r=4), hidden_size=HIDDEN, ffn_hidden_size=FFN)
    with pytest.raises(ConfigError, match="same \\(num_experts, num_slots, ep_size\\)"):
        Rebalancer([a, b], stats=None)
    with pytest.raises(ConfigError, match="no LoadStats"):
        Rebalancer([a], stats=None).plan()


# ---- distributed ------------------------------------------------------------------------------------------
STEPS, INTERVAL, LR = 6, 2, 0.01
_FAULT: dict[str, object] = {}


class _Monitor:
    """Stands in for DeepSpeed's MonitorMaster (`enabled`, `write_events`)."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[str, float, int]] = []

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        self.events.extend(events)


class _Net(nn.Module):
    """in-projection -> MoE layer -> MoE layer -> out-projection, fp32."""

    def __init__(self, cfg, ep_group) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.moe = nn.ModuleList(_skewed_layer(cfg, seed=i) for i in range(2))
        for i, layer in enumerate(self.moe):
            layer.layer_id = i
            layer.set_groups(ep_group=ep_group)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.moe[1](self.moe[0](self.inp(x))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(24, HIDDEN, generator=gen), torch.randn(24, HIDDEN, generator=gen)


def _homes(model: _Net) -> list[torch.Tensor]:
    return [p for layer in model.moe for p in (layer.experts.gate_up_proj, layer.experts.down_proj)]


def _train_step(model: _Net, opt: torch.optim.Optimizer, stats: LoadStats, rank: int, step: int, world: int,
                edp_group) -> float:
    """One optimizer step with DeepSpeed's reduction: dense grads over all ranks, homes over expert-DP."""
    x, t = _batch(rank, step)
    loss = ((model(x) - t) ** 2).mean()
    loss.backward()
    reduce_slot_grads(model)
    homes = {id(p) for p in _homes(model)}
    for p in model.parameters():
        dist.all_reduce(p.grad, group=edp_group if id(p) in homes else None)
        p.grad.div_(world)
    opt.step()
    opt.zero_grad()
    end_step(model, stats)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def _fault(phase: str, index: int) -> None:
    if _FAULT.get("phase") == phase and _FAULT.get("rank") == dist.get_rank():
        if _FAULT.get("sleep"):
            time.sleep(float(_FAULT["sleep"]))
        else:
            raise RuntimeError(f"injected fault in {phase} round {index}")


def _state(model: _Net) -> list[torch.Tensor]:
    return [t.detach().clone() for layer in model.moe
            for t in (layer.physical_to_logical, layer.experts.slot_gate_up, layer.experts.slot_down)]


def _scenario(rank: int, world: int, ep: int) -> dict[str, object]:
    cfg = moe_config(ep=ep, r=4, rate=0.01)
    ep_group, edp_group = ep_groups(world, ep)
    eplb = EplbConfig(enabled=True, interval=INTERVAL, window=4)
    out: dict[str, object] = {}

    # Run A rebalances every INTERVAL steps (small chunks: several rounds); run B never does.
    runs = {}
    for name in ("rebalance", "never"):
        model = _Net(cfg, ep_group)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        stats = LoadStats(list(model.moe), window=4)
        rb = Rebalancer(list(model.moe), stats=stats, config=eplb, chunk_bytes=600, debug=True, name=name,
                        timeout_s=20, monitor=_Monitor())
        runs[name] = (model, opt, stats, rb)
    losses: dict[str, list[float]] = {"rebalance": [], "never": []}
    reports = []
    for step in range(STEPS):
        for name, (model, opt, stats, rb) in runs.items():
            losses[name].append(_train_step(model, opt, stats, rank, step, world, edp_group))
            if name == "rebalance":
                report = rb.step(step + 1)
                if report is not None:
                    reports.append(report)
    out["losses"] = losses
    out["status"] = [r.status for r in reports]
    out["events"] = runs["rebalance"][3].monitor.events
    out["copies"] = [r.num_copies for r in reports]
    out["rounds"] = [r.num_rounds for r in reports]
    out["balancedness"] = [(r.balancedness_before, r.balancedness_after) for r in reports]
    out["placements_moved"] = [layer.placement != Placement.identity(cfg.num_experts, cfg.num_slots, num_ranks=ep)
                               for layer in runs["rebalance"][0].moe]

    # Outputs right before and after one more rebalance; homes and optimizer state untouched.
    model, opt, stats, rb = runs["rebalance"]
    model.eval()
    x, _ = _batch(rank, 99)
    with torch.no_grad():
        before = model(x)
        homes = [p.detach().clone() for p in _homes(model)]
        opt_state = {id(p): {k: (v.data_ptr(), v.clone()) for k, v in opt.state[p].items() if torch.is_tensor(v)}
                     for p in _homes(model)}
        maps_before = _state(model)[0::3]
        # Plan for a load that differs from the deployed one: every layer must move.
        load = torch.zeros(2, cfg.num_experts, dtype=torch.float64)
        load[:, -1] = 100.0
        load[:, :-1] = 1.0
        report = rb.apply(rb.plan(load), load_LE=load)
        after = model(x)
    out["forced"] = (report.applied, report.num_copies, report.bytes_sent, report.balancedness_after)
    out["forced_maps_changed"] = [not torch.equal(a, b) for a, b in zip(maps_before, _state(model)[0::3])]
    out["output_diff"] = float((before - after).abs().max())  # reported when not bitwise
    out["output_bitwise"] = bool(torch.equal(before, after))
    out["homes_equal"] = all(torch.equal(a, p) for a, p in zip(homes, _homes(model)))
    out["opt_state_equal"] = all(ptr == opt.state[p][k].data_ptr() and torch.equal(value, opt.state[p][k])
                                 for p in _homes(model) for k, (ptr, value) in opt_state[id(p)].items())
    model.train()

    # Injected failures: each keeps the old maps and slots on every rank; training continues.
    failures = []
    load.fill_(1.0)
    for index, layer in enumerate(model.moe):  # make an expert with a single replica the hot one
        load[index, layer.placement.replica_count.index(1)] = 100.0
    for fault in ({"phase": "pack", "rank": 1}, {"phase": "unpack", "rank": world - 1},
                  {"phase": "agree", "rank": 0, "sleep": 1.5}, {"phase": "plan", "rank": 1}):
        _FAULT.clear()
        _FAULT.update(fault)
        rb.fault_hook, rb.agree_timeout_s = _fault, 0.5
        snapshot = _state(model)
        # "plan": rank 1 plans from other statistics; the debug digest check must stop every rank.
        plan_load = torch.ones_like(load) if fault["phase"] == "plan" and rank == fault["rank"] else load
        report = rb.apply(rb.plan(plan_load), load_LE=load)
        unchanged = all(torch.equal(a, b) for a, b in zip(snapshot, _state(model)))
        failures.append((report.applied, report.status, unchanged, report.num_copies))
    _FAULT.clear()
    rb.fault_hook, rb.agree_timeout_s = None, 20.0
    out["failures"] = failures
    out["num_failed"] = rb.num_failed
    never_model, never_opt, never_stats, _ = runs["never"]
    after_failure = []
    for step in range(STEPS, STEPS + 2):
        after_failure.append((_train_step(model, opt, stats, rank, step, world, edp_group),
                              _train_step(never_model, never_opt, never_stats, rank, step, world, edp_group)))
    out["after_failure"] = after_failure
    report = rb.apply(rb.plan(load), load_LE=load)
    out["recovered"] = (report.applied, report.num_copies)
    return out


def _check_scenario(results: list[dict[str, object]]) -> None:
    first = results[0]
    assert all(r["losses"] == first["losses"] for r in results)  # the loss is all-reduced
    assert all(r["status"] == first["status"] for r in results)
    assert len(first["status"]) == STEPS // INTERVAL and "applied" in first["status"], first["status"]
    assert not any(s.startswith("failed") for s in first["status"]), first["status"]
    assert sum(first["copies"]) > 0 and max(first["rounds"]) > 1, first
    assert any(first["placements_moved"])
    events = {(name, step): value for name, value, step in first["events"]}
    assert events[("Train/MoE/eplb/copies", INTERVAL)] == first["copies"][0] > 0
    assert events[("Train/MoE/eplb/balancedness_after", INTERVAL)] > events[("Train/MoE/eplb/balancedness_before",
                                                                                INTERVAL)]
    assert events[("Train/MoE/eplb/stall_ms", INTERVAL)] > 0 and events[("Train/MoE/eplb/failures", INTERVAL)] == 0
    assert all(r["events"] == [] for r in results[1:])  # rank 0 writes
    # Replicas hold bitwise copies and each token's expert outputs are summed in the same order, so the
    # fp32 losses are not just close but equal.
    assert first["losses"]["rebalance"] == first["losses"]["never"]
    for result in results:
        applied, copies, _, _ = result["forced"]
        assert applied and copies > 0 and all(result["forced_maps_changed"]), result["forced"]
        # A new placement changes each slot's group size in the grouped GEMM, and CPU BLAS may round a row
        # differently with another M (seen: 4.7e-10): equal to fp32 rounding, not necessarily bitwise.
        assert result["output_bitwise"] or result["output_diff"] <= 1e-6, result["output_diff"]
        assert result["homes_equal"] and result["opt_state_equal"]
        for applied, status, unchanged, _ in result["failures"]:
            assert not applied and status.startswith("failed: abort") and unchanged, status
        assert "injected fault in pack" in result["failures"][0][1]
        assert "injected fault in unpack" in result["failures"][1][1]
        assert "ranks were ready" in result["failures"][2][1]
        assert "plan digests differ across ranks" in result["failures"][3][1]
        assert all(f[3] > 0 for f in result["failures"][:3])  # they failed with copies under way
        assert result["num_failed"] == 4
        assert all(ours == never for ours, never in result["after_failure"]), result["after_failure"]
        assert result["recovered"][0] and result["recovered"][1] > 0


@pytest.mark.dist
def test_rebalance_ep4_keeps_function_losses_and_survives_failures() -> None:
    _check_scenario(run_ranks(_scenario, world_size=4, args=(4,), timeout_s=150))


@pytest.mark.dist
def test_rebalance_ep2_dp2_keeps_function_losses_and_survives_failures() -> None:
    _check_scenario(run_ranks(_scenario, world_size=4, args=(2,), timeout_s=150))


@pytest.mark.dist
def test_bench_rebalance_tiny_cpu_runs_under_torchrun() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "bench" / "rebalance.py"), "--tiny", "--json", "--steps", "2", "--interval", "2"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    assert row["ep"] == 2 and row["device"] == "cpu" and row["slots"] == 12 and row["zipf"] == 0.6
    assert row["without"]["step_ms_median"] > 0 and row["with"]["step_ms_median"] > 0 and row["speedup"] > 0
    assert row["rebalance"]["status"] in ("applied", "skipped: the plan keeps every slot")
    assert row["rebalance"]["stall_s_ms"] >= row["rebalance"]["plan_s_ms"] > 0
    assert len(row["with"]["rebalance_stall_ms"]) == 1  # --interval 2 over 2 timed steps
