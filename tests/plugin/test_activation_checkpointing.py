"""Activation checkpointing (`activation_checkpoint_interval`) under every schedule: the reference's numbers.

Each stage runs its layers in chunks of the interval through DeepSpeed's checkpoint function (reentrant by
default, non-reentrant with `"pipeline": {"use_reentrant": false}`); the I/W split defers the weight grads
that the recompute's backward produces. A rank function also counts what a checkpointed stage keeps.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, Case, check_against_reference, loss_fn, mlp_specs, train

pytestmark = pytest.mark.dist

CASES = (
    # reentrant DeepSpeed checkpoint, chunks of 2 layers (stages of 4 for 1f1b/dualpipe, of 2 for the V schedules)
    Case(kinds=("1f1b", "zbv", "dualpipev", "dualpipe"), pipe=2, micro_batches=4, num_layers=8, steps=2, lr=0.1,
         pipeline=(("activation_checkpoint_interval", 2),)),
    # non-reentrant, every layer its own chunk
    Case(kinds=("zbv", "dualpipev"), pipe=2, micro_batches=4, num_layers=4,
         pipeline=(("activation_checkpoint_interval", 1), ("use_reentrant", False))),
    # int position ids and a bool mask enter and leave checkpointed chunks; tied embedding and head
    Case(kinds=("zbv",), pipe=2, micro_batches=4, model="tied", num_layers=4,
         pipeline=(("activation_checkpoint_interval", 1), ("static_shapes", False))),
)


@pytest.mark.parametrize("case", CASES, ids=["reentrant-k2", "non-reentrant-k1", "tied-k1"])
def test_activation_checkpointing_matches_reference(case: Case) -> None:
    check_against_reference(case, run_ranks(train, 2, args=(case,), timeout_s=240), weights=case.steps > 1,
                            tol=1e-10)


def _saved_tensors(rank: int, world_size: int, via_json: bool) -> tuple[int, int]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    model = PipelineModule(mlp_specs(8), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=BASE_SEED,
                           partition_method="uniform", activation_checkpoint_interval=0 if via_json else 2)
    case = Case(kinds=("1f1b",), pipe=2, micro_batches=4, num_layers=8,
                pipeline=(("activation_checkpoint_interval", 2),) if via_json else ())
    engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=case.config("1f1b"))
    assert engine.module.activation_checkpoint_interval == 2  # from the module, or the JSON through DeepSpeed
    stage = next(iter(engine.module.stages.values()))
    x = torch.randn(2, 8, requires_grad=True)
    counts = []
    for interval in (2, 0):
        engine.module.activation_checkpoint_interval = interval
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = stage(x)
        counts.append(saved)  # kept by the forward (the recompute in backward saves again, briefly)
        out.sum().backward()
    return counts[0], counts[1]


@pytest.mark.parametrize("via_json", [False, True], ids=["module", "json"])
def test_activation_checkpointing_keeps_only_chunk_inputs(via_json: bool) -> None:
    for checkpointed, plain in run_ranks(_saved_tensors, 2, args=(via_json,), timeout_s=120):
        # 4 layers in 2 chunks: DeepSpeed's reentrant checkpoint keeps each chunk's input in its own context
        # (outside autograd's saved tensors), none of its layers' activations
        assert plain > 0 and checkpointed < plain / 2, (checkpointed, plain)
