"""A tied embedding/head with int position ids and a bool mask crossing every stage boundary.

The token micro-batches have sequence lengths 2, 3, 4, 5, so every message changes shape: shapes travel with
every message (`pipeline.static_shapes: false`).
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks
from tests.plugin.pipeline_models import Case, check_against_reference, loss_fn, train


@pytest.mark.dist
def test_engine_tied_head_and_int_bool_tensors_match_reference() -> None:
    # 1f1b: embedding and head on different ranks (tied grads summed); dualpipev: both on rank 0, one
    # module; dualpipe: both on ranks 0 and P-1, each a copy summed with its mirror. Two steps with SGD
    # check the tied copies stay equal after an update.
    case = Case(kinds=("1f1b", "dualpipev", "dualpipe"), pipe=2, micro_batches=4, model="tied", num_layers=6,
                steps=2, lr=0.1, pipeline=(("static_shapes", False),))
    check_against_reference(case, run_ranks(train, 2, args=(case,), timeout_s=240), weights=True, tol=1e-10)


def _static_by_default(rank: int, world_size: int) -> tuple[str, str, int]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    case = Case(kinds=("1f1b",), pipe=2, micro_batches=4, model="tied", num_layers=4)
    outcome = []
    for dynamic_shape in (False, True):  # DeepSpeed's own switch decides under static_shapes "auto"
        model = PipelineModule(case.specs(), num_stages=2, loss_fn=loss_fn, seed_layers=True,
                               partition_method="uniform", dynamic_shape=dynamic_shape)
        engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=case.config("1f1b"))
        try:
            engine.train_batch(iter(case.data()))
            outcome.append(engine._comm.headers_sent + engine._comm.headers_received)
        except Exception as err:  # each rank reports its own error
            outcome += [type(err).__name__, str(err)]
    return tuple(outcome)


@pytest.mark.dist
def test_engine_static_shapes_by_default_names_the_changed_message_and_the_fix() -> None:
    # static_shapes "auto" = static for a PipelineModule without dynamic_shape=True (DeepSpeed's default too):
    # micro-batch 1 is longer than micro-batch 0, so stage 0's second output is refused before it is sent.
    (kind0, message0, headers0), (kind1, message1, headers1) = run_ranks(_static_by_default, 2, timeout_s=90)
    assert kind0 == "StageError", message0
    assert ("rank 0 (pp 0, dp 0), step 0, action 0SEND_F1 (#3): ConfigError: pipeline.static_shapes: message "
            "('F', 0, 1) to pp rank 1") in message0
    assert 'Set "pipeline": {"static_shapes": false}' in message0
    assert kind1 == "PeerAborted" and "stopped because rank 0 (pp 0, dp 0), step 0, action 0SEND_F1" in message1
    # PipelineModule(dynamic_shape=True): shapes travel with all 8 messages (4 forward, 4 grads) of the step.
    assert headers0 == headers1 == 8
