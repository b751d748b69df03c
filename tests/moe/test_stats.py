"""Load statistics: window and EMA bookkeeping, per-rank loads with replicas, balancedness, monitor events.
(The cross-rank all-reduce is exercised by the distributed layer tests, whose router biases must match.)"""

from __future__ import annotations

import pytest
import torch
from dualmoe.moe.placement import Placement
from dualmoe.moe.stats import LoadStats, balancedness, rank_loads


class _FakeLayer:
    """Counts handed out in order; placement maps of a fixed Placement."""

    def __init__(self, placement: Placement, loads: list[list[int]]) -> None:
        self.physical_to_logical = torch.tensor(placement.physical_to_logical)
        self.replica_count = torch.tensor(placement.replica_count)
        self.ep_size = placement.num_ranks
        self._loads = [torch.tensor(x) for x in loads]

    def take_local_load(self) -> torch.Tensor:
        return self._loads.pop(0)


def test_stats_window_and_ema() -> None:
    placement = Placement.identity(4, 4, num_ranks=2)
    layers = [_FakeLayer(placement, [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 8]]),
              _FakeLayer(placement, [[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]])]
    stats = LoadStats(layers, window=2, ema_decay=0.5)
    first = stats.step()
    assert first.tolist() == [[1, 2, 3, 4], [4, 0, 0, 0]]
    assert stats.ema_LE.tolist() == first.tolist(), "the EMA starts at the first step"
    stats.step()
    stats.step()
    assert stats.num_steps == 3
    assert stats.window_load().tolist() == [[5, 6, 7, 16], [0, 4, 4, 0]], "only the last 2 steps"
    assert stats.ema_LE[0].tolist() == pytest.approx([1.5, 2.0, 2.5, 7.0])
    restored = LoadStats(layers, window=2, ema_decay=0.5)
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.window_load(), stats.window_load()) and restored.num_steps == 3


def test_stats_rank_loads_split_over_replicas_and_balancedness() -> None:
    placement = Placement.from_physical_to_logical([0, 1, 0, 2], num_experts=3, num_ranks=2)
    load = torch.tensor([[10.0, 4.0, 6.0]])
    loads = rank_loads(load, torch.tensor([placement.physical_to_logical]),
                       torch.tensor([placement.replica_count]), 2)
    assert loads.tolist() == [[9.0, 11.0]]
    assert balancedness(loads) == pytest.approx(placement.balancedness([10.0, 4.0, 6.0]))
    two = torch.tensor([[9.0, 11.0], [5.0, 5.0]])
    assert balancedness(two) == pytest.approx((10 + 5) / (11 + 5)), "sum of means over sum of maxima"
    assert balancedness(torch.zeros(1, 2)) == 1.0


def test_stats_events_for_the_deepspeed_monitor() -> None:
    placement = Placement.identity(4, 4, num_ranks=2)
    stats = LoadStats([_FakeLayer(placement, [[3, 1, 1, 1]]), _FakeLayer(placement, [[1, 1, 1, 1]])])
    stats.step()
    events = stats.events(step=64)
    assert events[0] == ("Train/MoE/balancedness", pytest.approx((3 + 2) / (4 + 2)), 64)
    assert [name for name, _, _ in events[1:]] == ["Train/MoE/balancedness_layer0", "Train/MoE/balancedness_layer1"]


def test_stats_rejects_mixed_expert_counts() -> None:
    with pytest.raises(ValueError, match=r"same num_experts; got \[4, 6\]"):
        LoadStats([_FakeLayer(Placement.identity(4, 4), []), _FakeLayer(Placement.identity(6, 6), [])])
