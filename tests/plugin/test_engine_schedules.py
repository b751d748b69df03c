"""Every schedule kind on gloo matches a one-process reference: per-micro-batch losses bitwise, grads per param."""

from __future__ import annotations

import pytest

from tests.harness import run_ranks
from tests.plugin.pipeline_models import Case, check_against_reference, train

ALL_KINDS = ("1f1b", "zb1p", "zbv", "dualpipev", "dualpipe")


@pytest.mark.dist
def test_engine_every_schedule_matches_reference_on_two_ranks() -> None:
    case = Case(kinds=ALL_KINDS, pipe=2, micro_batches=4, num_layers=6)
    check_against_reference(case, run_ranks(train, 2, args=(case,), timeout_s=240))


@pytest.mark.dist
def test_engine_every_schedule_matches_reference_on_four_ranks() -> None:
    case = Case(kinds=ALL_KINDS, pipe=4, micro_batches=8, num_layers=8)
    check_against_reference(case, run_ranks(train, 4, args=(case,), timeout_s=240))


@pytest.mark.dist
def test_engine_every_schedule_matches_reference_with_data_parallel() -> None:
    case = Case(kinds=ALL_KINDS, pipe=2, dp=2, micro_batches=4, num_layers=4)
    check_against_reference(case, run_ranks(train, 4, args=(case,), timeout_s=240))
