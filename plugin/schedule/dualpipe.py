"""DualPipe: the bidirectional schedule of DeepSeek-V3 (deepseek-ai/DualPipe `dualpipe.py`).

Two model copies run in opposite directions over P ranks (P even). Copy 0 is stages 0..P-1 with stage s on
rank s; copy 1 is stages P..2P-1 with stage P+j on rank P-1-j. The first m/2 micro-batches enter copy 0 at
rank 0, the last m/2 enter copy 1 at rank P-1 (`Schedule.copy_of`).

Each rank runs DualPipeV's eight steps (see `dualpipev`) as "half rank" h = min(r, P-1-r) of a P/2-rank V
with m/2 chunks per phase: step 4 runs m/2-P+h+1 times, and the two middle ranks (h = P/2-1) do not
overlap their first step-4 pair. Phase 0 is the copy travelling away from the rank's own end: copy 0 on
ranks < P/2, copy 1 on ranks >= P/2 (the reference XORs the phase with `is_in_second_half`). The order for
P=4, m=8 (copy 0 = stages 0..3 = micro-batches 0..3, copy 1 = stages 4..7 = micro-batches 4..7; "|"
separates the non-empty steps):

    0: 0F0 0F1 | 0F2 7F4 | 7I4 7W4 7F5 | 0F3&7B5 7F6&0B0 | 7B6 7F7&0B1 | 7B7 0I2 | 0W2 0I3 | 0W3
    1: 1F0 6F4 1F1 6F5 | 1F2 6B4 6F6&1B0 1F3&6B5 6F7&1B1 | 6B6 1B2 6I7 1I3 | 6W7 1W3
    2: 5F4 2F0 5F5 2F1 | 5F6 2B0 2F2&5B4 5F7&2B1 2F3&5B5 | 2B2 5B6 2I3 5I7 | 2W3 5W7
    3: 4F4 4F5 | 4F6 3F0 | 3I0 3W0 3F1 | 4F7&3B1 3F2&4B4 | 3B2 3F3&4B5 | 3B3 4I6 | 4W6 4I7 | 4W7

Ranks r and P-1-r hold the same model parts (stages r and 2P-1-r of opposite copies), so their gradients
must be all-reduced before the optimizer step. Source: https://github.com/deepseek-ai/DualPipe
(dualpipe/dualpipe.py, `DualPipe.step`), checked against a trace of that code in tests/golden/dualpipe_*.txt.
"""

from __future__ import annotations

from .dualpipev import check_dualpipe_sizes, eight_steps
from .ir import Action, ActionType, Schedule

__all__ = ["dualpipe"]


def _rank_actions(num_ranks: int, num_microbatches: int, rank: int) -> list[list[Action]]:
    """Steps 1..8 of one rank, in global stages and micro-batch ids."""
    half_ranks = num_ranks // 2
    half_rank = min(rank, num_ranks - 1 - rank)
    half_chunks = num_microbatches // 2
    in_second_half = int(rank >= half_ranks)
    # Real phase 0 = copy 0 (stage r, micro-batch = chunk); real phase 1 = copy 1 (stage 2P-1-r, m/2 + chunk).
    stage_of_copy = (rank, 2 * num_ranks - 1 - rank)

    def place(kind: ActionType, phase: int, chunk: int) -> Action:
        copy = phase ^ in_second_half
        return Action(stage_of_copy[copy], kind, copy * half_chunks + chunk)

    return eight_steps(half_ranks, half_rank, half_chunks, place)


def dualpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """The DualPipe order for `num_ranks` ranks (two model copies, 2P stages) and `num_microbatches`.

    Args:
        num_ranks: pipeline ranks P, even and >= 2; rank r holds stage r of copy 0 and stage 2P-1-r of copy 1.
        num_microbatches: m, even and >= 2P; micro-batches 0..m/2-1 walk copy 0, m/2..m-1 copy 1.

    Returns:
        A compute-only `Schedule` of kind "dualpipe" with `num_copies=2`.

    Raises:
        ScheduleError: P odd or < 2, or m odd or < 2P.
    """
    check_dualpipe_sizes("dualpipe", num_ranks, num_microbatches, bidirectional=True)
    actions = tuple(tuple(action for step in _rank_actions(num_ranks, num_microbatches, rank) for action in step)
                    for rank in range(num_ranks))
    stage_to_rank = tuple(range(num_ranks)) + tuple(reversed(range(num_ranks)))
    return Schedule(kind="dualpipe", num_ranks=num_ranks, num_microbatches=num_microbatches,
                    num_stages=2 * num_ranks, stage_to_rank=stage_to_rank, actions=actions, num_copies=2)
