"""Checkpoints: resuming gives the next losses bitwise; weights load into another schedule, optimizer state not."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, batches, loss_fn, mlp_specs

pytestmark = pytest.mark.dist


def _build(schedule: str) -> Any:
    import dualmoe
    from deepspeed.pipe import PipelineModule

    model = PipelineModule(mlp_specs(4), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=BASE_SEED,
                           partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
              "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01,
                                                           "warmup_num_steps": 5}},
              "pipeline": {"schedule": schedule, "partition_method": "uniform", "timeout_s": 60}}
    engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _losses(engine: Any) -> dict[int, list[float]]:
    return {mb: v.tolist() for mb, v in engine.micro_batch_losses.items()}


def _resume(rank: int, world_size: int, schedule: str, other: str, ckpt_dir: str) -> dict[str, Any]:
    import deepspeed
    from dualmoe.errors import ConfigError

    deepspeed.init_distributed(dist_backend="gloo")
    data = batches("mlp", 16, seed=5, dtype=torch.float32)
    steps = [data[4 * s:4 * s + 4] for s in range(4)]
    first = _build(schedule)
    for s in range(2):
        first.train_batch(iter(steps[s]))
    first.save_checkpoint(ckpt_dir, tag="t2")
    evaluated = float(first.eval_batch(iter(steps[0])))
    continued = []
    for s in (2, 3):
        first.train_batch(iter(steps[s]))
        continued.append(_losses(first))
    resumed_engine = _build(schedule)
    resumed_engine.load_checkpoint(ckpt_dir, tag="t2")
    resumed = []
    for s in (2, 3):
        resumed_engine.train_batch(iter(steps[s]))
        resumed.append(_losses(resumed_engine))
    moved = _build(other)
    try:
        moved.load_checkpoint(ckpt_dir, tag="t2")
        refused = ""
    except ConfigError as err:
        refused = str(err)
    moved.load_checkpoint(ckpt_dir, tag="t2", load_optimizer_states=False, load_lr_scheduler_states=False)
    return {"continued": continued, "resumed": resumed, "refused": refused, "eval": evaluated,
            "eval_moved": float(moved.eval_batch(iter(steps[0]))), "steps": resumed_engine.global_steps}


@pytest.mark.parametrize(("schedule", "other"), [("dualpipe", "1f1b"), ("dualpipev", "dualpipe")])
def test_engine_resume_gives_identical_next_losses(tmp_path: Any, schedule: str, other: str) -> None:
    results = run_ranks(_resume, 2, args=(schedule, other, str(tmp_path)), timeout_s=240)
    for r in results:
        assert r["resumed"] == r["continued"]
        assert r["steps"] == 4
        # Weights are per layer: another schedule computes the same forward from them.
        assert r["eval_moved"] == r["eval"]
        assert f"'schedule': '{schedule}'" in r["refused"] and "load_optimizer_states=False" in r["refused"]
    assert any(r["continued"][0] for r in results)  # some rank computed losses
    assert (tmp_path / "t2" / "dualmoe_layout.json").is_file()
    # DualPipe holds every part twice but writes each layer once.
    assert sorted(p.name for p in (tmp_path / "t2").glob("layer_*")) == [f"layer_0{i}-model_states.pt"
                                                                         for i in range(4)]
