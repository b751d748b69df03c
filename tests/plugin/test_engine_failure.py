"""A stage that raises, or a rank that stops answering, ends every rank with an error naming where."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from deepspeed.pipe import LayerSpec
from torch import Tensor, nn

from tests.harness import run_ranks
from tests.plugin.pipeline_models import Block, batches, loss_fn

pytestmark = pytest.mark.dist


class Faulty(nn.Module):
    """A Block that, on the process whose `arm` was called, fails at its `fail_at`-th forward (0-based)."""

    fail_at: int | None = None
    hang_s: float = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if Faulty.fail_at is not None and self.calls == Faulty.fail_at + 1:
            if Faulty.hang_s:
                time.sleep(Faulty.hang_s)
            raise ValueError(f"injected failure at forward {Faulty.fail_at}")
        return self.block(x)


def _run(rank: int, world_size: int, kind: str, pipe: int, bad_rank: int, hang_s: float,
         timeout_s: float) -> tuple[str, str]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    if rank == bad_rank:
        Faulty.fail_at, Faulty.hang_s = 3, hang_s
    # Layer 2 is the Faulty one: pp rank 1 holds it under 1f1b (layers 2-3) and dualpipev (stage 2).
    specs = [LayerSpec(Block), LayerSpec(Block), LayerSpec(Faulty), LayerSpec(Block)]
    model = PipelineModule(specs, num_stages=pipe, loss_fn=loss_fn, seed_layers=True, partition_method="uniform")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
              "pipeline": {"schedule": kind, "timeout_s": timeout_s, "partition_method": "uniform"}}
    engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
    try:
        engine.train_batch(iter(batches("mlp", 4, seed=0, dtype=torch.float32)))
    except Exception as err:  # each rank reports its own error to the test
        return type(err).__name__, str(err)
    return "ok", ""


def test_engine_raising_stage_stops_every_rank_with_its_position() -> None:
    # PP2 x DP2 (global ranks: 0 = pp0/dp0, 1 = pp0/dp1, 2 = pp1/dp0, 3 = pp1/dp1); global rank 2 raises in
    # the forward of micro-batch 3. Its DP replica does not depend on it through p2p and must stop at the
    # step-end agreement. The deadline (120 s) exceeds the harness's (90 s): only the abort flag can end
    # the waits in time.
    results: list[Any] = run_ranks(_run, 4, args=("dualpipev", 2, 2, 0.0, 120.0), timeout_s=90)
    kinds = [kind for kind, _ in results]
    assert kinds[2] == "StageError", results[2]
    assert "rank 2 (pp 1, dp 0), step 0, action" in results[2][1] and "F3" in results[2][1]
    assert "injected failure at forward 3" in results[2][1]
    for rank in (0, 1, 3):
        assert kinds[rank] == "PeerAborted", (rank, results[rank])
        assert f"rank {rank} (pp " in results[rank][1]
        assert "stopped because rank 2 (pp 1, dp 0), step 0, action" in results[rank][1]


def test_engine_hung_rank_makes_peers_time_out_naming_it() -> None:
    # Rank 1 stops answering for 6 s in micro-batch 3's forward; with pipeline.timeout_s = 2 rank 0 must
    # give up with CommTimeout naming the message it waited for from pp rank 1.
    results = run_ranks(_run, 2, args=("1f1b", 2, 1, 6.0, 2.0), timeout_s=90)
    kind, message = results[0]
    assert kind == "CommTimeout", results[0]
    assert "rank 0 (pp 0, dp 0), step 0, action 0B" in message and "from pp rank 1" in message
    assert "pipeline.timeout_s" in message
