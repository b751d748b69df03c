"""A tied embedding/head with int position ids and a bool mask crossing every stage boundary.

The token micro-batches have sequence lengths 2, 3, 4, 5, so every message changes shape.
"""

from __future__ import annotations

import pytest

from tests.harness import run_ranks
from tests.plugin.pipeline_models import Case, check_against_reference, train


@pytest.mark.dist
def test_engine_tied_head_and_int_bool_tensors_match_reference() -> None:
    # 1f1b: embedding and head on different ranks (tied grads summed); dualpipev: both on rank 0, one
    # module; dualpipe: both on ranks 0 and P-1, each a copy summed with its mirror. Two steps with SGD
    # check the tied copies stay equal after an update.
    case = Case(kinds=("1f1b", "dualpipev", "dualpipe"), pipe=2, micro_batches=4, model="tied", num_layers=6,
                steps=2, lr=0.1)
    check_against_reference(case, run_ranks(train, 2, args=(case,), timeout_s=240), weights=True, tol=1e-10)
