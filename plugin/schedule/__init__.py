"""Pipeline schedules as data: the action IR, one generator per schedule family, lowering passes."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ScheduleError
from .ir import COMM_TYPES, COMPUTE_TYPES, Action, ActionType, Schedule
from .lowering import check_p2p_order, insert_p2p, split_backward, validate

__all__ = [
    "COMM_TYPES",
    "COMPUTE_TYPES",
    "SCHEDULE_KINDS",
    "Action",
    "ActionType",
    "Schedule",
    "check_p2p_order",
    "generate",
    "insert_p2p",
    "split_backward",
    "validate",
]

# Names are what users type in "pipeline": {"schedule": ...} and `dualmoe schedule --kind`.
SCHEDULE_KINDS = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")


def _generators() -> dict[str, Callable[[int, int], Schedule]]:
    from .dualpipe import dualpipe
    from .dualpipev import dualpipev
    from .one_f_one_b import one_f_one_b
    from .zero_bubble import zb1p, zbv

    return {"1f1b": one_f_one_b, "zb1p": zb1p, "zbv": zbv, "dualpipe": dualpipe, "dualpipev": dualpipev}


def generate(kind: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Compute-only schedule of `kind` for `num_ranks` pipeline ranks and `num_microbatches` micro-batches.

    Raises:
        ScheduleError: unknown kind, or (num_ranks, num_microbatches) violates the kind's constraints.
    """
    generators = _generators()
    if kind not in generators:
        raise ScheduleError(f"schedule kind {kind!r} is unknown; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    return generators[kind](num_ranks, num_microbatches)
