"""MoE step hooks inside a real DeepSpeed engine (deepspeed.initialize, gloo, CPU): ZeRO-0 and ZeRO-1 at
EP2 x DP2 with redundant slots train exactly like a single-process reference (fp32 tolerance)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.utils import configure_moe_param_groups
from dualmoe.moe.hooks import MoEEngineMixin, end_step, initialize, reduce_slot_grads
from dualmoe.moe.layer import MoELayer
from dualmoe.moe.placement import Placement
from dualmoe.moe.stats import LoadStats
from torch import nn

from tests.harness import run_ranks
from tests.moe._common import FFN, HIDDEN, moe_config

GAS, STEPS, LR = 2, 3, 0.2


class _Net(nn.Module):
    """in-projection -> MoE layer -> out-projection: dense and expert parameters both train."""

    def __init__(self, cfg, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        # Per-expert seeded init (init_std) is the same at any EP size; large weights make every grad count.
        self.moe = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, seed=seed, init_std=0.5)
        with torch.no_grad():
            self.moe.gate.weight.normal_(0.0, 0.5)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((self.out(self.moe(self.inp(x))) - target) ** 2).mean()


def _batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(2, 4, HIDDEN, generator=gen), torch.randn(2, 4, HIDDEN, generator=gen)


def _reference_losses(cfg, world: int) -> tuple[list[float], nn.Module]:
    ref = _Net(cfg.model_copy(update={"ep_size": 1, "num_redundant_experts": 0}), seed=0)
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    stats = LoadStats([ref.moe], local_only=True)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in range(GAS):
            for r in range(world):
                loss = ref(*_batch(r, step, micro)) / (GAS * world)
                loss.backward()
                total += float(loss.detach())
        reduce_slot_grads(ref)
        opt.step()
        opt.zero_grad()
        end_step(ref, stats)
        losses.append(total)
    return losses, ref


def _train_deepspeed(rank: int, world: int, stage: int, bf16: bool = False) -> dict[str, float]:
    cfg = moe_config(ep=2, r=2, rate=0.05)
    model = _Net(cfg, seed=0)
    # DeepSpeed clips at norm 1.0 by default, with a DP-averaged norm for MoE models (runtime/utils.py
    # clip_grad_norm_) that no single-process reference reproduces: compare unclipped training.
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GAS, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 1000}
    if bf16:  # DeepSpeed casts parameters only: slot buffers must follow; fp32 grad accumulation (BF16_Optimizer)
        ds_config.update({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}})
    # A client optimizer gets DeepSpeed's MoE param groups from configure_moe_param_groups.
    params = configure_moe_param_groups(list(model.parameters()))
    engine, optimizer, _, _ = initialize(model=model, model_parameters=params, config=ds_config,
                                         optimizer=lambda groups: torch.optim.SGD(groups, lr=LR))
    assert isinstance(engine, MoEEngineMixin)
    assert engine.has_moe_layers and model.moe.ep_size == 2 and model.moe.ep_rank == rank % 2
    groups = getattr(optimizer, "optimizer", optimizer).param_groups  # the torch optimizer inside any wrapper
    moe_groups = [i for i, g in enumerate(groups) if g.get("moe")]
    assert moe_groups, "no MoE param group for the expert homes"
    if stage and not bf16:  # ZeRO-1 partitions the homes over the expert-data-parallel group (2 of the 4 ranks)
        assert optimizer.partition_count[moe_groups[0]] == world // 2
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(GAS):
            x, y = _batch(rank, step, micro)
            loss = engine(x.bfloat16(), y.bfloat16()) if bf16 else engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float() / GAS
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world)
    if bf16:
        assert model.moe.experts.slot_gate_up.dtype == torch.bfloat16
    ref_losses, ref = _reference_losses(cfg, world)
    gate_up, down = model.moe.gather_expert_weights()
    diff = lambda a, b: float((a.detach().float() - b.detach()).abs().max())  # noqa: E731
    return {
        "loss": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "gate_up": diff(gate_up, ref.moe.experts.gate_up_proj),
        "down": diff(down, ref.moe.experts.down_proj),
        "router": diff(model.moe.gate.weight, ref.moe.gate.weight),
        "bias": diff(model.moe.gate.e_score_correction_bias, ref.moe.gate.e_score_correction_bias),
        "inp": diff(model.inp.weight, ref.inp.weight),
        "balancedness": engine.moe_stats.balancedness(),
        "steps": engine.moe_stats.num_steps,
    }


def _all_configs(rank: int, world: int) -> list[dict[str, float]]:
    return [_train_deepspeed(rank, world, 0), _train_deepspeed(rank, world, 1),
            _train_deepspeed(rank, world, 1, bf16=True)]


@pytest.mark.dist
def test_hooks_deepspeed_engine_zero0_zero1_bf16_ep2_dp2_equal_reference() -> None:
    """fp32 ZeRO-0 and ZeRO-1 to fp32 round-off; bf16 ZeRO-1 (BF16_Optimizer) to bf16 round-off (weights ~1.7,
    a missing expert gradient would be off by ~0.1)."""
    for per_config in run_ranks(_all_configs, world_size=4, timeout_s=200):
        for result, tol in zip(per_config, (2e-6, 2e-6, 2e-2), strict=True):
            assert result["steps"] == STEPS
            assert 0 < result["balancedness"] <= 1
            diffs = {k: v for k, v in result.items() if k not in ("steps", "balancedness")}
            assert all(v < tol for v in diffs.values()), (tol, diffs)


# ---- MoE layers inside a 2-stage DualPipeV pipeline -------------------------------------------------------
PIPE_MB, PIPE_STEPS, PIPE_LR, PIPE_SEED = 4, 2, 0.05, 1234


class _MoEBlock(nn.Module):
    """x + MoE(x) on [tokens, hidden] activations (one pipeline layer)."""

    def __init__(self, redundant: int) -> None:
        super().__init__()
        cfg = moe_config(ep=1, r=redundant, rate=0.05)
        self.moe = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, init_std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(x)


def _pipe_specs(redundant: int) -> list:
    from deepspeed.runtime.pipe.module import LayerSpec

    from tests.plugin.pipeline_models import Block

    return [LayerSpec(Block), LayerSpec(_MoEBlock, redundant), LayerSpec(Block), LayerSpec(_MoEBlock, redundant)]


def _pipe_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(6, HIDDEN, generator=gen), torch.randn(6, HIDDEN, generator=gen))
            for _ in range(PIPE_STEPS * PIPE_MB)]


def _pipe_reference() -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    from deepspeed.runtime import utils as ds_utils

    from tests.plugin.pipeline_models import loss_fn

    layers = nn.ModuleList()
    for index, spec in enumerate(_pipe_specs(redundant=0)):
        ds_utils.set_random_seed(PIPE_SEED + index)  # DeepSpeed's seed_layers: layer i built alike everywhere
        layers.append(spec.build())
    opt = torch.optim.SGD(layers.parameters(), lr=PIPE_LR)
    stats = LoadStats([m for m in layers.modules() if isinstance(m, MoELayer)], local_only=True)
    data, losses = _pipe_data(), []
    for step in range(PIPE_STEPS):
        step_losses = []
        for x, y in data[step * PIPE_MB:(step + 1) * PIPE_MB]:
            for layer in layers:
                x = layer(x)
            loss = loss_fn(x, y)
            (loss / PIPE_MB).backward()
            step_losses.append(float(loss.detach()))
        reduce_slot_grads(layers)
        opt.step()
        opt.zero_grad()
        end_step(layers, stats)
        losses.append(step_losses)
    return losses, {n: p.detach().clone() for n, p in layers.named_parameters()}


def _pipe_train(rank: int, world: int, redundant: int) -> dict:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    from tests.plugin.pipeline_models import loss_fn

    deepspeed.init_distributed(dist_backend="gloo")
    model = PipelineModule(_pipe_specs(redundant), num_stages=2, loss_fn=loss_fn, seed_layers=True,
                           base_seed=PIPE_SEED, partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": PIPE_MB, "steps_per_print": 10**6,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "optimizer": {"type": "SGD", "params": {"lr": PIPE_LR}},
              "pipeline": {"schedule": "dualpipev", "timeout_s": 60, "partition_method": "uniform"}}
    # dualmoe.initialize builds the MoE-aware pipeline engine for stages holding MoE layers.
    engine, _, _, _ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert type(engine).__name__ == "MoEDualPipeEngine"
    assert engine.has_moe_layers and engine.moe_stats is not None
    data, losses = _pipe_data(), []
    for step in range(PIPE_STEPS):
        engine.train_batch(iter(data[step * PIPE_MB:(step + 1) * PIPE_MB]))
        losses.append({mb: float(v) for mb, v in engine.micro_batch_losses.items()})
    # numpy, not tensors: torch shares tensor storage with the parent by fd, which dies with this process.
    return {"losses": losses, "moe_steps": engine.moe_stats.num_steps,
            "weights": {n: p.detach().numpy().copy() for n, p in engine.module.named_parameters()}}


@pytest.mark.dist
@pytest.mark.parametrize("redundant", [2])
def test_hooks_moe_inside_two_stage_dualpipev_matches_reference(redundant: int) -> None:
    ref_losses, ref_weights = _pipe_reference()
    results = run_ranks(_pipe_train, world_size=2, args=(redundant,), timeout_s=180)
    for step in range(PIPE_STEPS):
        seen = {}
        for r in results:
            seen.update(r["losses"][step])
        assert sorted(seen) == list(range(PIPE_MB))
        for mb, value in seen.items():
            assert value == pytest.approx(ref_losses[step][mb], rel=1e-5, abs=1e-6), (step, mb)
    covered = set()
    for r in results:
        assert r["moe_steps"] == PIPE_STEPS
        for name, value in r["weights"].items():
            assert torch.allclose(torch.from_numpy(value), ref_weights[name], rtol=1e-5, atol=1e-6), name
            covered.add(name)
    assert covered == set(ref_weights)


# ---- the engine class the API builds: checkpoints of every EP rank, rebalancer from the JSON ----------------
def _json_engine(cfg, seed: int, *, moe_section: dict | None):
    model = _Net(cfg, seed=seed)
    with torch.no_grad():  # skewed routing: the rebalancer has work at EP=2
        model.moe.gate.e_score_correction_bias.copy_(torch.linspace(0.8, -0.8, cfg.num_experts))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 1000}
    if moe_section is not None:
        ds_config["moe"] = moe_section
    params = configure_moe_param_groups(list(model.parameters()))
    engine, *_ = initialize(model=model, model_parameters=params, config=ds_config,
                            optimizer=lambda groups: torch.optim.SGD(groups, lr=LR))
    return engine, model


def _engine_class_checks(rank: int, world: int, folder: str) -> dict:
    import deepspeed
    from deepspeed.moe.utils import is_moe_param
    from dualmoe.moe.checkpoint import MoECheckpointMixin
    from dualmoe.moe.hooks import moe_engine_class
    from dualmoe.moe.rebalance import attach_rebalancer

    cls = moe_engine_class(deepspeed.DeepSpeedEngine)
    out = {"class": issubclass(cls, MoECheckpointMixin) and issubclass(cls, MoEEngineMixin)
           and moe_engine_class(cls) is cls and moe_engine_class(deepspeed.DeepSpeedEngine) is cls}
    cfg = moe_config(ep=2, r=2, rate=0.0)
    section = {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "ep_size": 2, "num_redundant_experts": 2,
               "num_shared_experts": 1, "router": {"n_group": 4, "topk_group": 2, "bias_update_rate": 0.0},
               "eplb": {"enabled": True, "interval": 1, "window": 2}}
    engine, model = _json_engine(cfg, 0, moe_section=section)
    out["auto"] = engine.moe_rebalancer is not None and engine.moe_rebalancer.config.interval == 1
    for step in range(2):
        x, y = _batch(rank, step, 0)
        engine.backward(engine(x, y))
        engine.step()
    out["applied"] = engine.moe_rebalancer.num_applied
    out["moved"] = model.moe.placement != Placement.identity(8, 10, num_ranks=2)
    engine.save_checkpoint(folder, tag="t")
    other, other_model = _json_engine(cfg, 1, moe_section=None)  # no JSON section: no automatic rebalancer
    out["no_auto"] = other.moe_rebalancer is None
    other.load_checkpoint(folder, tag="t")
    probe = _batch(rank, 9, 0)
    with torch.no_grad():
        out["same_loss"] = bool(torch.equal(model(*probe), other_model(*probe)))
    out["same_placement"] = other_model.moe.placement == model.moe.placement
    homes = [p for p in model.parameters() if is_moe_param(p)]
    out["same_homes"] = all(torch.equal(a, b) for a, b in zip(homes, [p for p in other_model.parameters()
                                                                         if is_moe_param(p)], strict=True))
    explicit = attach_rebalancer(other, name="explicit")
    out["replaced"] = other.moe_rebalancer is explicit
    # A model without MoE layers: the same engine class behaves like DeepSpeed's.
    dense = nn.Linear(HIDDEN, HIDDEN)
    plain, *_ = initialize(model=dense, model_parameters=dense.parameters(),
                           config={"train_micro_batch_size_per_gpu": 1, "steps_per_print": 1000,
                                   "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    plain.save_checkpoint(folder, tag="dense")
    plain.load_checkpoint(folder, tag="dense")
    out["plain"] = plain.moe_rebalancer is None and not plain.has_moe_layers
    return out


@pytest.mark.dist
def test_hooks_engine_class_checkpoints_every_ep_rank_and_builds_the_rebalancer_from_the_json(tmp_path) -> None:
    for result in run_ranks(_engine_class_checks, world_size=2, args=(str(tmp_path),), timeout_s=150):
        assert result["class"] and result["auto"] and result["no_auto"] and result["replaced"], result
        assert result["applied"] >= 1 and result["moved"], result
        assert result["same_loss"] and result["same_placement"] and result["same_homes"], result
        assert result["plain"], result
