"""Expert load statistics: tokens per logical expert per layer, reduced once per step, for EPLB and logs.

Legend: L MoE layers (in model order), E logical experts, S slots, P EP ranks, W window length.

Each `MoELayer` counts in its forward how many routed copies went to each logical expert (a local
int64 buffer, no communication). Once per optimizer step `LoadStats.step()` stacks the L counters,
all-reduces them in one collective over the stage's data-parallel group (every rank that runs the
layers), and keeps

    last_LE     the step's global counts (drives the aux-loss-free bias update),
    window      the last W steps (ring buffer [W, L, E]; `window_load()` sums it),
    ema_LE      an exponential moving average with the configured decay,

so every rank holds identical statistics and the EPLB planner needs no further agreement.
Balancedness of a placement = mean / max of the per-rank load when each expert's load splits evenly
over its replicas; over layers it is sum_l mean_l / sum_l max_l (vLLM's and SGLang's definition).
`events()` gives (name, value, step) tuples for DeepSpeed's `monitor.write_events`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

__all__ = ["CountingLayer", "LoadStats", "balancedness", "rank_loads"]


class CountingLayer(Protocol):
    """What `LoadStats` needs from a MoE layer."""

    physical_to_logical: Tensor  # [S]
    replica_count: Tensor  # [E]

    @property
    def ep_size(self) -> int: ...

    def take_local_load(self) -> Tensor:
        """[E] copies routed to each logical expert on this rank since the last call (then reset)."""
        ...


def rank_loads(load_LE: Tensor, physical_to_logical_LS: Tensor, replica_count_LE: Tensor, num_ranks: int) -> Tensor:
    """[L, P] load per EP rank when each expert's load splits evenly over its replicas."""
    per_slot_LS = (load_LE.double() / replica_count_LE.double()).gather(1, physical_to_logical_LS)
    return per_slot_LS.view(load_LE.shape[0], num_ranks, -1).sum(dim=-1)


def balancedness(loads_LP: Tensor) -> float:
    """sum_l mean_p load / sum_l max_p load; 1.0 when perfectly balanced or empty."""
    top = loads_LP.max(dim=-1).values.sum()
    return 1.0 if float(top) <= 0 else float(loads_LP.mean(dim=-1).sum() / top)


class LoadStats:
    """Load statistics of a model's (or pipeline stage's) MoE layers.

    Args:
        layers: the MoE layers in model order (all with the same E and EP size).
        window: W steps kept.
        ema_decay: decay of the moving average (new = decay * old + (1 - decay) * step).
        group: the process group to sum counts over (every rank running these layers); None means
            the default group when torch.distributed is initialised.
        local_only: never reduce (a single-process model inside a distributed job, e.g. a reference).
    """

    def __init__(self, layers: Sequence[CountingLayer], *, window: int = 32, ema_decay: float = 0.9,
                 group: dist.ProcessGroup | None = None, local_only: bool = False) -> None:
        if not layers:
            raise ValueError("LoadStats needs at least one MoE layer")
        sizes = {int(layer.replica_count.numel()) for layer in layers}
        if len(sizes) != 1:
            raise ValueError(f"all MoE layers of one LoadStats need the same num_experts; got {sorted(sizes)}")
        self.layers = list(layers)
        self.num_layers, self.num_experts = len(layers), sizes.pop()
        self.window, self.ema_decay, self.group, self.local_only = window, ema_decay, group, local_only
        device = layers[0].replica_count.device
        self._ring = torch.zeros(window, self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self.ema_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self.last_LE = torch.zeros_like(self.ema_LE)
        self.num_steps = 0

    @torch.no_grad()
    def step(self) -> Tensor:
        """Reduce this step's counts over the group and record them (collective; call once per step).

        Returns:
            [L, E] float64 global token counts of the step.
        """
        with record_function("dualmoe/moe/stats"):
            local_LE = torch.stack([layer.take_local_load() for layer in self.layers]).to(torch.float64)
            if not self.local_only and dist.is_available() and dist.is_initialized():
                dist.all_reduce(local_LE, group=self.group)
            local_LE = local_LE.to(self._ring.device)
            self._ring[self.num_steps % self.window] = local_LE
            decay = 0.0 if self.num_steps == 0 else self.ema_decay
            self.ema_LE.mul_(decay).add_(local_LE, alpha=1.0 - decay)
            self.last_LE = local_LE
            self.num_steps += 1
            return local_LE

    def window_load(self) -> Tensor:
        """[L, E] counts summed over the last min(W, steps) steps."""
        return self._ring.sum(dim=0)

    def rank_loads(self, load_LE: Tensor | None = None) -> Tensor:
        """[L, P] per-rank load of the current placements (default: the last step's counts)."""
        load = self.last_LE if load_LE is None else load_LE
        p2l = torch.stack([layer.physical_to_logical for layer in self.layers]).to(load.device)
        counts = torch.stack([layer.replica_count for layer in self.layers]).to(load.device)
        return rank_loads(load, p2l, counts, self.layers[0].ep_size)

    def balancedness(self, load_LE: Tensor | None = None) -> float:
        """Balancedness of the current placements over all layers (default: last step's counts)."""
        return balancedness(self.rank_loads(load_LE))

    def events(self, step: int, *, prefix: str = "Train/MoE") -> list[tuple[str, float, int]]:
        """Monitor events for `engine.monitor.write_events`: overall and per-layer balancedness."""
        loads = self.rank_loads()
        out = [(f"{prefix}/balancedness", balancedness(loads), step)]
        out += [(f"{prefix}/balancedness_layer{i}", balancedness(loads[i:i + 1]), step)
                for i in range(self.num_layers)]
        return out

    def state_dict(self) -> dict[str, Tensor | int]:
        """Window, EMA and step count (for checkpoints)."""
        return {"ring": self._ring.clone(), "ema": self.ema_LE.clone(), "last": self.last_LE.clone(),
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore what `state_dict` returned."""
        self._ring.copy_(state["ring"])
        self.ema_LE.copy_(state["ema"])
        self.last_LE = state["last"].to(self._ring.device).clone()
        self.num_steps = int(state["num_steps"])
