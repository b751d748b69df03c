"""Micro-batch data and the tensors a step keeps per (stage, micro-batch).

Data convention (the same as DeepSpeed's PipelineEngine, extended to two stages per rank):
`data_iter` yields one `(inputs, labels)` per micro-batch, `inputs`/`labels` a tensor or a tuple of
tensors. Every pipeline rank that holds the first or the last stage of some micro-batch's path pulls
all m micro-batches of a step from its own `data_iter`, in micro-batch order, and keeps what its stages
need: `inputs` of the micro-batches that enter at its stage, `labels` of those whose loss it computes.

    schedule            ranks that read data_iter (m batches each per step)
    1f1b, zb1p          pp rank 0 (inputs) and pp rank P-1 (labels), as DeepSpeed
    zbv, dualpipev      pp rank 0 only (stage 0 takes inputs, stage 2P-1 the labels)
    dualpipe            pp rank 0: inputs of micro-batches 0..m/2-1, labels of m/2..m-1
                        pp rank P-1: inputs of m/2..m-1, labels of 0..m/2-1

So one script that hands the same (data-parallel sharded) iterator to every rank works for all kinds.
Batches are pulled lazily, when a stage first needs one, and the rest at the end of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataFeed", "StepState", "as_tuple"]


def as_tuple(x: Any) -> tuple[Any, ...]:
    """A tensor as a 1-tuple, a list or tuple as a tuple."""
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        if device.type == "cuda" and x.device.type == "cpu":
            # A copy from pageable memory waits for the device to drain; from pinned memory it does not, so
            # the host keeps queueing the schedule ahead of the device.
            x = x.detach()
            return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
        return x.detach().to(device)
    if isinstance(x, (tuple, list)):
        return tuple(_to_device(t, device) for t in x)
    return x


class DataFeed:
    """One step's micro-batches on one rank, pulled from `data_iter` in order and on demand.

    Args:
        data_iter: yields `(inputs, labels)` per micro-batch (or None where this rank reads no data).
        num_microbatches: batches to pull per step.
        device: where tensors go.
        batch_fn: DeepSpeed's `set_batch_fn` post-processing, or None.
    """

    def __init__(self, data_iter: Iterator[Any] | None, *, num_microbatches: int, device: torch.device,
                 batch_fn: Callable[[Any], Any] | None = None) -> None:
        self.data_iter = data_iter
        self.num_microbatches = num_microbatches
        self.device = device
        self.batch_fn = batch_fn
        self._batches: dict[int, Any] = {}
        self._pulled = 0

    def _get(self, microbatch: int) -> Any:
        if self.data_iter is None:
            raise RuntimeError("this rank needs micro-batches but has no data iterator; pass data_iter to "
                               "train_batch/eval_batch (or training_data to initialize) on every rank that "
                               "holds a first or last stage")
        while self._pulled <= microbatch:
            batch = next(self.data_iter)
            if self.batch_fn is not None:
                batch = self.batch_fn(batch)
            self._batches[self._pulled] = batch
            self._pulled += 1
        return self._batches[microbatch]

    def inputs(self, microbatch: int) -> tuple[Tensor, ...]:
        """The first stage's inputs of `microbatch` (batch[0]) as a tuple of detached device tensors."""
        return as_tuple(_to_device(self._get(microbatch)[0], self.device))

    def labels(self, microbatch: int) -> Any:
        """The labels of `microbatch` (batch[1]) on the device, tensor or tuple as given."""
        return _to_device(self._get(microbatch)[1], self.device)

    def drain(self) -> None:
        """Pull the step's remaining micro-batches so the iterator stays aligned with other ranks."""
        if self.data_iter is not None and self._pulled < self.num_microbatches:
            self._get(self.num_microbatches - 1)
        self._batches.clear()


Key = tuple[int, int]  # (stage, micro-batch)


@dataclass(slots=True)
class StepState:
    """What one step holds between actions; every entry is removed by the action that last needs it.

    Attributes:
        inputs: stage inputs (leaves; their `.grad` are the input grads after backward).
        outputs: stage outputs, kept for SEND_F and backward.
        output_grads: grads of a stage's outputs, received or handed over by a local next stage.
        input_grads: input grads waiting for their SEND_B.
        losses: loss of a micro-batch with its graph, until its backward.
        loss_values: detached losses, by micro-batch (for the step's mean and for callers).
        logits: loss-stage outputs kept for `eval_batch(return_logits=True)`.
    """

    inputs: dict[Key, tuple[Tensor, ...]] = field(default_factory=dict)
    outputs: dict[Key, tuple[Tensor, ...]] = field(default_factory=dict)
    output_grads: dict[Key, tuple[Tensor | None, ...]] = field(default_factory=dict)
    input_grads: dict[Key, tuple[Tensor | None, ...]] = field(default_factory=dict)
    losses: dict[int, Tensor] = field(default_factory=dict)
    loss_values: dict[int, Tensor] = field(default_factory=dict)
    logits: dict[int, Any] = field(default_factory=dict)

    def leftovers(self) -> list[str]:
        """Names of buffers still holding tensors (should be none after a training step)."""
        return [name for name in ("inputs", "outputs", "output_grads", "input_grads", "losses")
                if getattr(self, name)]
