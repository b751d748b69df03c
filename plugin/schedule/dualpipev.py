"""DualPipeV: the V-shaped ("cut-in-half") DualPipe schedule of deepseek-ai/DualPipe `dualpipev.py`.

The model is cut into 2P stages; rank r holds stage r (phase 0, outbound) and stage 2P-1-r (phase 1, the
return leg), so a micro-batch runs 0 -> P-1 on phase 0, turns around locally on rank P-1 and comes back
P..2P-1 on phase 1; inputs, labels and the loss live on rank 0. Every rank runs the reference's eight
steps (counts per rank r, m = num_microbatches):

    step  pattern    count        backward flavour
    1     nF0        2(P-r-1)
    2     nF0F1      r+1
    3     nB1W1F1    P-r-1        I (input-grad) then the W it queued, then F1
    4     nF0B1F1B0  m-2P+r+1     overlapped pairs F0&B1, F1&B0 with full B (rank P-1: first pair not overlapped)
    5     nB1F1B0    P-r-1        full B1, then F1&B0
    6     nB1B0      r+1          full B until half-way, then I (odd r switches before B1, even r before B0)
    7     nWB0       P-r-1        pop one W, then I of phase 0
    8     nW         r+1          drain the queued W's

W's are popped first-in first-out, as the reference's `WeightGradStore` does. The order for P=4, m=10
(stages 0..3 outbound = phase 0, 7..4 return = phase 1; "a&b" = overlapped pair; "|" separates the
non-empty steps):

    0: 0F0 0F1 0F2 0F3 0F4 0F5 | 0F6 7F0 | 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 | 0F7&7B3 7F4&0B0 0F8&7B4 7F5&0B1
           0F9&7B5 7F6&0B2 | 7B6 7F7&0B3 7B7 7F8&0B4 7B8 7F9&0B5 | 7B9 0I6 | 0W6 0I7 0W7 0I8 0W8 0I9 | 0W9
    1: 1F0 1F1 1F2 1F3 | 1F4 6F0 1F5 6F1 | 6I0 6W0 6F2 6I1 6W1 6F3 | 1F6&6B2 6F4&1B0 1F7&6B3 6F5&1B1 1F8&6B4 6F6&1B2
           1F9&6B5 6F7&1B3 | 6B6 6F8&1B4 6B7 6F9&1B5 | 6B8 1B6 6I9 1I7 | 6W9 1I8 1W7 1I9 | 1W8 1W9
    2: 2F0 2F1 | 2F2 5F0 2F3 5F1 2F4 5F2 | 5I0 5W0 5F3 | 2F5&5B1 5F4&2B0 2F6&5B2 5F5&2B1 2F7&5B3 5F6&2B2 2F8&5B4
           5F7&2B3 2F9&5B5 5F8&2B4 | 5B6 5F9&2B5 | 5B7 2B6 5B8 2I7 5I9 2I8 | 2W7 2I9 | 5W9 2W8 2W9
    3: 3F0 4F0 3F1 4F1 3F2 4F2 3F3 4F3 | 3F4 4B0 4F4&3B0 3F5&4B1 4F5&3B1 3F6&4B2 4F6&3B2 3F7&4B3 4F7&3B3 3F8&4B4
           4F8&3B4 3F9&4B5 4F9&3B5 | 4B6 3B6 4B7 3B7 4I8 3I8 4I9 3I9 | 4W8 3W8 4W9 3W9

Source: https://github.com/deepseek-ai/DualPipe (dualpipe/dualpipev.py, `DualPipeV.step`), checked against a
trace of that code for many (P, m) in tests/golden/dualpipev_*.txt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..errors import ScheduleError
from .ir import Action, ActionType, Schedule

__all__ = ["dualpipev"]

# Maps (type, phase, chunk index within that phase) to the Action it means for one rank.
Place = Callable[[ActionType, int, int], Action]


class _PhaseCounter:
    """Next chunk per phase for F and backward, plus the FIFO of split backwards awaiting their W."""

    def __init__(self, place: Place) -> None:
        self._place = place
        self._next_f = [0, 0]
        self._next_b = [0, 0]
        self._pending_w: deque[tuple[int, int]] = deque()

    def forward(self, phase: int) -> Action:
        chunk = self._next_f[phase]
        self._next_f[phase] += 1
        return self._place(ActionType.F, phase, chunk)

    def backward(self, phase: int, split: bool = False) -> Action:
        chunk = self._next_b[phase]
        self._next_b[phase] += 1
        if split:
            self._pending_w.append((phase, chunk))
            return self._place(ActionType.I, phase, chunk)
        return self._place(ActionType.B, phase, chunk)

    def weight(self) -> Action:
        phase, chunk = self._pending_w.popleft()
        return self._place(ActionType.W, phase, chunk)

    def overlap(self, forward_phase: int, backward_phase: int) -> Action:
        return Action.overlap(self.forward(forward_phase), self.backward(backward_phase))


def eight_steps(num_ranks: int, rank: int, num_chunks: int, place: Place) -> list[list[Action]]:
    """One rank's actions of the reference `step()`, grouped as steps 1..8 (list index 0..7).

    `num_ranks`/`rank`/`num_chunks` are in DualPipeV terms; DualPipe calls this with P/2 "half ranks" and m/2.
    """
    counter = _PhaseCounter(place)
    steps: list[list[Action]] = [[] for _ in range(8)]
    is_last_rank = rank == num_ranks - 1
    # Step 1: nF0 -- warm-up forwards of the outbound leg.
    for _ in range(2 * (num_ranks - rank - 1)):
        steps[0].append(counter.forward(0))
    # Step 2: nF0F1
    for _ in range(rank + 1):
        steps[1] += [counter.forward(0), counter.forward(1)]
    # Step 3: nB1W1F1 -- zero bubble: input-grad backward, then at once the weight-grad it queued.
    for _ in range(num_ranks - rank - 1):
        steps[2] += [counter.backward(1, split=True), counter.weight(), counter.forward(1)]
    # Step 4 (main step): nF0B1F1B0 -- two overlapped pairs per iteration.
    for i in range(num_chunks - 2 * num_ranks + rank + 1):
        if i == 0 and is_last_rank:
            # The reference runs this first pair back to back, not overlapped, "to further reduce bubble size".
            steps[3] += [counter.forward(0), counter.backward(1)]
        else:
            steps[3].append(counter.overlap(0, 1))
        steps[3].append(counter.overlap(1, 0))
    # Step 5: nB1F1B0
    for _ in range(num_ranks - rank - 1):
        steps[4] += [counter.backward(1), counter.overlap(1, 0)]
    # Step 6: nB1B0 -- the second half of these backwards are split; rank parity picks where the switch falls.
    num_step6 = rank + 1
    split = False
    for i in range(num_step6):
        if i == num_step6 // 2 and rank % 2 == 1:
            split = True
        steps[5].append(counter.backward(1, split))
        if i == num_step6 // 2 and rank % 2 == 0:
            split = True
        steps[5].append(counter.backward(0, split))
    # Step 7: nWB0
    for _ in range(num_ranks - rank - 1):
        steps[6] += [counter.weight(), counter.backward(0, split=True)]
    # Step 8: nW -- drain.
    for _ in range(rank + 1):
        steps[7].append(counter.weight())
    return steps


def check_dualpipe_sizes(kind: str, num_ranks: int, num_microbatches: int, *, bidirectional: bool) -> None:
    """Raise ScheduleError naming the violated DualPipe(V) constraint on (P, m)."""
    if num_ranks < 1 or (bidirectional and (num_ranks < 2 or num_ranks % 2)):
        rule = "an even number >= 2" if bidirectional else ">= 1"
        raise ScheduleError(f"{kind}: num_ranks={num_ranks} must be {rule}")
    if bidirectional and (num_microbatches % 2 or num_microbatches < 2 * num_ranks):
        raise ScheduleError(f"{kind}: num_microbatches={num_microbatches} must be even and >= 2 x num_ranks "
                            f"({2 * num_ranks})")
    if num_microbatches < 2 * num_ranks:
        raise ScheduleError(f"{kind}: num_microbatches={num_microbatches} must be >= 2 x num_ranks "
                            f"({2 * num_ranks})")


def dualpipev(num_ranks: int, num_microbatches: int) -> Schedule:
    """The DualPipeV order for `num_ranks` ranks (2 x num_ranks stages) and `num_microbatches` micro-batches.

    Args:
        num_ranks: pipeline ranks P >= 1; rank r holds stages r and 2P-1-r.
        num_microbatches: m >= 2P; every micro-batch walks stages 0..2P-1.

    Returns:
        A compute-only `Schedule` of kind "dualpipev" (lower it with `insert_p2p`).

    Raises:
        ScheduleError: P < 1 or m < 2P.
    """
    check_dualpipe_sizes("dualpipev", num_ranks, num_microbatches, bidirectional=False)
    num_stages = 2 * num_ranks
    actions = []
    for rank in range(num_ranks):
        stage_of_phase = (rank, num_stages - 1 - rank)

        def place(kind: ActionType, phase: int, chunk: int, stage_of_phase=stage_of_phase) -> Action:
            return Action(stage_of_phase[phase], kind, chunk)

        steps = eight_steps(num_ranks, rank, num_microbatches, place)
        actions.append(tuple(action for step in steps for action in step))
    stage_to_rank = tuple(s if s < num_ranks else num_stages - 1 - s for s in range(num_stages))
    return Schedule(kind="dualpipev", num_ranks=num_ranks, num_microbatches=num_microbatches,
                    num_stages=num_stages, stage_to_rank=stage_to_rank, actions=tuple(actions))
