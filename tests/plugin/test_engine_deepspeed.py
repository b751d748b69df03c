"""The same script under DeepSpeed's PipelineEngine and under a schedule gives the same numbers.

Adam, an LR scheduler from the JSON, eval_batch and DeepSpeed's counters; gradient clipping against a
one-process reference (DeepSpeed's own fp32 clipping counts only pipeline stage 0's grads in the norm).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, Case, batches, check_against_reference, loss_fn, mlp_specs, train

pytestmark = pytest.mark.dist


def _script(rank: int, world_size: int, schedules: tuple[str | None, ...]) -> list[dict[str, Any]]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for schedule in schedules:
        model = PipelineModule(mlp_specs(4), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=BASE_SEED,
                               partition_method="uniform")
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
                  "gradient_clipping": 0.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
                  "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01,
                                                               "warmup_num_steps": 4}},
                  "pipeline": {"partition_method": "uniform"}}
        if schedule is not None:
            config["pipeline"]["schedule"] = schedule
        engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
        data = batches("mlp", 4, seed=3, dtype=torch.float32)
        losses = [float(engine.train_batch(iter(data))) for _ in range(3)]
        evals = float(engine.eval_batch(iter(batches("mlp", 4, seed=4, dtype=torch.float32))))
        out.append({"engine": type(engine).__name__, "losses": losses, "eval": evals, "lr": engine.get_lr(),
                    "steps": engine.global_steps, "samples": engine.global_samples})
    return out


def test_engine_same_script_same_numbers_as_deepspeed_pipeline_engine() -> None:
    stock, dualpipev, dualpipe = run_ranks(_script, 2, args=((None, "dualpipev", "dualpipe"),), timeout_s=240)[0]
    assert stock["engine"] == "PipelineEngine"
    assert dualpipev["engine"] == dualpipe["engine"] == "DualPipeEngine"
    for ours in (dualpipev, dualpipe):
        # Step 0 is bitwise; Adam steps then start from grads summed in another order.
        assert ours["losses"][0] == stock["losses"][0]
        np.testing.assert_allclose(ours["losses"], stock["losses"], rtol=1e-5)
        np.testing.assert_allclose(ours["eval"], stock["eval"], rtol=1e-5)
        assert ours["lr"] == stock["lr"] and ours["steps"] == stock["steps"] == 3
        assert ours["samples"] == stock["samples"]
    assert stock["losses"][2] < stock["losses"][0]  # the same batch three times: training did something


def test_engine_gradient_clipping_matches_reference() -> None:
    case = Case(kinds=("1f1b", "dualpipev", "dualpipe"), pipe=2, micro_batches=4, num_layers=4, steps=2, lr=0.5,
                clip=0.05)
    check_against_reference(case, run_ranks(train, 2, args=(case,), timeout_s=240), grads=False, weights=True,
                            tol=1e-10)
