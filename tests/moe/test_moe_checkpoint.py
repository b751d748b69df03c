"""MoE checkpoints by logical expert: load-statistics files, the logical state dict, and DeepSpeed engines
(gloo, ZeRO-0, Adam): resume after a rebalance at EP=4 gives the same next losses, and the same checkpoint
loads at EP=2 x DP=2 with the same outputs, placement, biases, statistics and optimizer state."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from deepspeed.moe.utils import configure_moe_param_groups
from dualmoe.errors import ConfigError
from dualmoe.moe.checkpoint import (
    load_checkpoint,
    load_logical_state_dict,
    logical_state_dict,
    read_load_stats,
    save_checkpoint,
    save_load_stats,
)
from dualmoe.moe.config import EplbConfig
from dualmoe.moe.hooks import initialize
from dualmoe.moe.layer import MoELayer
from dualmoe.moe.placement import Placement
from dualmoe.moe.rebalance import attach_rebalancer
from dualmoe.moe.stats import LoadStats
from torch import nn

from tests.harness import run_ranks
from tests.moe._common import FFN, HIDDEN, moe_config


# ---- load-statistics files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_load_stats_file_round_trips(tmp_path, suffix: str) -> None:
    load = torch.rand(3, 8, dtype=torch.float64)
    placement = torch.randint(0, 8, (3, 12))
    path = save_load_stats(tmp_path / f"s{suffix}", load, placement_LS=placement, num_ranks=4, step=7)
    got = read_load_stats(path)
    assert torch.equal(got["load"], load) and torch.equal(got["placement"], placement)
    assert got["num_ranks"] == 4 and got["step"] == 7


def test_load_stats_file_accepts_bare_arrays_and_rejects_bad_ones(tmp_path) -> None:
    (tmp_path / "bare.json").write_text(json.dumps([[1, 2, 3], [0, 0, 5]]))
    assert read_load_stats(tmp_path / "bare.json")["load"].shape == (2, 3)
    torch.save(torch.ones(4), tmp_path / "one.pt")
    assert read_load_stats(tmp_path / "one.pt")["load"].shape == (1, 4)
    (tmp_path / "neg.json").write_text(json.dumps({"load": [[1, -2]]}))
    with pytest.raises(ConfigError, match=r"finite values >= 0; got shape \(1, 2\)"):
        read_load_stats(tmp_path / "neg.json")
    (tmp_path / "x.json").write_text(json.dumps({"counts": [1]}))
    with pytest.raises(ConfigError, match="no 'load' entry"):
        read_load_stats(tmp_path / "x.json")
    with pytest.raises(ConfigError, match=r"use a \.pt or \.json suffix"):
        save_load_stats(tmp_path / "s.csv", torch.ones(1, 2))
    with pytest.raises(ConfigError, match="does not exist"):
        read_load_stats(tmp_path / "missing.pt")


# ---- logical state dict, one process -------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self, cfg, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.moe = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, seed=seed)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        with torch.no_grad():  # skewed routing so the rebalancer has work
            self.moe.gate.e_score_correction_bias.copy_(torch.linspace(0.6, -0.6, cfg.num_experts))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        y = self.out(self.moe(self.inp(x)))
        return y if target is None else ((y - target) ** 2).mean()


def test_logical_state_dict_restores_experts_placement_bias_and_stats() -> None:
    cfg = moe_config(r=4)
    src, dst = _Net(cfg, seed=0), _Net(cfg, seed=1)
    stats, dst_stats = LoadStats([src.moe], window=3), LoadStats([dst.moe], window=2)
    for _ in range(4):
        src(torch.randn(16, HIDDEN))
        stats.step()
    src.moe.set_placement(Placement.from_physical_to_logical([7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 1, 2], num_experts=8))
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("moe.experts.")}, strict=False)
    state = logical_state_dict(src, stats=stats)
    load_logical_state_dict(dst, state, stats=dst_stats)
    x = torch.randn(5, HIDDEN)
    assert torch.equal(src(x), dst(x))
    assert dst.moe.placement == src.moe.placement
    assert torch.equal(dst.moe.gate.e_score_correction_bias, src.moe.gate.e_score_correction_bias)
    assert torch.equal(dst_stats.ema_LE, stats.ema_LE) and dst_stats.num_steps == 4
    assert torch.equal(dst_stats.window_load(), stats._ring[[3 % 3, 2 % 3]].sum(0))  # the last 2 of 4 steps
    with pytest.raises(ConfigError, match=r"num_experts=8, the model 4"):
        load_logical_state_dict(_Net(moe_config(e=4, n_group=2, k=2), seed=0), state)


# ---- DeepSpeed engines ---------------------------------------------------------------------------------------
STEPS, MORE, LR = 4, 2, 0.01


def _engine(ep: int, seed: int):
    cfg = moe_config(ep=ep, r=4, rate=0.01).model_copy(
        update={"eplb": EplbConfig(enabled=True, interval=2, window=4)})
    model = _Net(cfg, seed=seed)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**6}
    params = configure_moe_param_groups(list(model.parameters()))
    engine, *_ = initialize(model=model, model_parameters=params, config=ds_config,
                            optimizer=lambda groups: torch.optim.Adam(groups, lr=LR))
    return engine, model


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, HIDDEN, generator=gen), torch.randn(16, HIDDEN, generator=gen)


def _train(engine, rank: int, world: int, steps) -> list[float]:
    losses = []
    for step in steps:
        loss = engine(*_batch(rank, step))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    return losses


def _logical(engine, model) -> dict:
    return logical_state_dict(model, stats=engine.moe_stats, optimizer=engine.optimizer)["layers"]["moe"]


def _resume_and_resize(rank: int, world: int, folder: str) -> dict[str, object]:
    probe = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5))
    # Run A at EP=4: train (a rebalance happens at steps 2 and 4), save, train MORE steps.
    engine, model = _engine(4, seed=0)
    rebalancer = attach_rebalancer(engine, chunk_bytes=800, debug=True, timeout_s=30)
    _train(engine, rank, world, range(STEPS))
    moved = model.moe.placement != Placement.identity(8, 12, num_ranks=4)
    save_checkpoint(engine, folder, tag="t")
    with torch.no_grad():
        out_a = model(probe)
    saved = _logical(engine, model)
    losses_a = _train(engine, rank, world, range(STEPS, STEPS + MORE))
    # Run B at EP=4 from other weights: load, train the same MORE steps.
    engine_b, model_b = _engine(4, seed=1)
    attach_rebalancer(engine_b, name="b")
    load_checkpoint(engine_b, folder, tag="t")
    with torch.no_grad():
        out_b = model_b(probe)
    same_state = _same(saved, _logical(engine_b, model_b))
    losses_b = _train(engine_b, rank, world, range(STEPS, STEPS + MORE))
    # Run C at EP=2 x DP=2: load the EP=4 checkpoint (optimizer state re-sliced by expert), train MORE steps.
    engine_c, model_c = _engine(2, seed=2)
    load_checkpoint(engine_c, folder)  # tag from "latest"
    with torch.no_grad():
        out_c = model_c(probe)
    resized_state = _same(saved, _logical(engine_c, model_c), ignore=("ep_size",))
    losses_c = _train(engine_c, rank, world, range(STEPS, STEPS + MORE))
    return {"moved": moved, "applied": rebalancer.num_applied, "losses": (losses_a, losses_b, losses_c),
            "out_b": bool(torch.equal(out_a, out_b)), "out_c": float((out_a - out_c).abs().max()),
            "same_state": same_state, "resized_state": resized_state,
            "c_placement": model_c.moe.placement.physical_to_logical == model.moe.placement.physical_to_logical}


def _same(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys of two logical records whose values differ (tensors bitwise)."""
    diffs = []

    def walk(x, y, path: str) -> None:
        if isinstance(x, dict):
            for key in x:
                if key not in ignore:
                    walk(x[key], y[key], f"{path}.{key}")
        elif torch.is_tensor(x):
            if not torch.equal(x.cpu(), y.cpu()):
                diffs.append(path)
        elif x != y:
            diffs.append(path)

    walk(a, b, "")
    return diffs


@pytest.mark.dist
def test_checkpoint_resume_after_rebalance_and_load_at_another_ep_size(tmp_path) -> None:
    results = run_ranks(_resume_and_resize, world_size=4, args=(str(tmp_path),), timeout_s=170)
    for result in results:
        assert result["moved"] and result["applied"] >= 1
        losses_a, losses_b, losses_c = result["losses"]
        assert losses_b == losses_a  # same EP size: bitwise
        assert losses_c == pytest.approx(losses_a, rel=1e-6, abs=1e-7)  # EP=2: other summation order
        assert result["out_b"] and result["out_c"] < 1e-6
        assert result["same_state"] == [] and result["resized_state"] == [], result
        assert result["c_placement"]
