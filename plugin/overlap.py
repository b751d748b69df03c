"""Forward/backward overlap protocol: one call runs F of micro-batch A and B of micro-batch B.

DualPipe's steady state pairs the forward of one micro-batch with the backward of another
(`Action.overlap(f, b)`, printed "0F5&3B1"). The engine hands both halves to an `OverlapFn`:

    outputs0, loss0 = overlap(ForwardWork(module=m0, inputs=..., loss_fn=..., labels=...),
                              BackwardWork(module=m1, loss=... or outputs=..., output_grads=...))

and then reads the input grads of micro-batch B from the `.grad` of its saved stage inputs, as
in the reference (deepseek-ai/DualPipe `_forward_backward_compute_chunk`). What an OverlapFn may
do in between (streams, threads, splitting each layer into attention / dispatch / MLP / combine
pieces and interleaving them so all-to-all hides behind compute) is its own business; the
results must not depend on the interleaving, which the tests check with `backward_first_overlap`.

Which function runs a pair is chosen once by `resolve_overlap`:

1. an `OverlapFn` registered on the engine (explicit, never looked up by attribute name);
2. else the stage class's `overlapped_forward_backward`, with the reference's signature
   `(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1)
   -> (outputs0, loss0)`, when both modules are of that class (adapted by `ModuleOverlap`);
3. else `serial_overlap`: F then B, no overlap.

The W split composes: the engine opens `queue.capture(key)` around the whole call when the
paired backward should defer its weight grads; forward work never touches the queue.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from dualmoe.log import warn_once
from torch import Tensor, nn

__all__ = [
    "HOOK_NAME",
    "BackwardWork",
    "ForwardWork",
    "ModuleOverlap",
    "OverlapFn",
    "backward_first_overlap",
    "resolve_overlap",
    "run_backward",
    "run_forward",
    "serial_overlap",
]

_log = logging.getLogger(__name__)

HOOK_NAME = "overlapped_forward_backward"
_HOOK_SIGNATURE = "(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1)"


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardWork:
    """The forward half of a pair: `module(*inputs)`, then `loss_fn(*outputs, *labels)` on a last stage.

    Attributes:
        module: the stage module that runs the forward.
        inputs: its positional inputs (received activations or the micro-batch).
        loss_fn: the criterion on a last stage, else None.
        labels: the criterion's extra arguments (empty without `loss_fn`).
    """

    module: nn.Module
    inputs: tuple[Tensor, ...]
    loss_fn: Callable[..., Tensor] | None = None
    labels: tuple[Tensor, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class BackwardWork:
    """The backward half of a pair: either `loss.backward()` (last stage) or outputs with their grads.

    Attributes:
        module: the stage module whose graph is walked (for hooks that split work per layer).
        loss: the (already scaled, under fp16) loss of a last stage, else None.
        outputs: the stage outputs of that micro-batch (empty when `loss` is given).
        output_grads: grads received for `outputs`, None where nothing flows back.
    """

    module: nn.Module
    loss: Tensor | None = None
    outputs: tuple[Tensor, ...] = ()
    output_grads: tuple[Tensor | None, ...] = ()

    def __post_init__(self) -> None:
        if (self.loss is None) == (len(self.outputs) == 0):
            raise ValueError("BackwardWork needs exactly one of loss= or outputs= (with output_grads=)")
        if len(self.outputs) != len(self.output_grads):
            raise ValueError(
                f"BackwardWork: {len(self.outputs)} outputs but {len(self.output_grads)} output_grads; "
                "pass one grad (or None) per output"
            )


class OverlapFn(Protocol):
    """Runs the forward of one micro-batch and the backward of another, in any interleaving.

    Returns:
        `(outputs, loss)`: the forward's outputs as a tuple and its loss (None unless `loss_fn`).
    """

    def __call__(self, forward: ForwardWork, backward: BackwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]: ...


def run_forward(work: ForwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """Run the forward half: outputs as a tuple, and the loss when `work.loss_fn` is set."""
    outputs = work.module(*work.inputs)
    outputs = _as_tuple(outputs)
    loss = work.loss_fn(*outputs, *work.labels) if work.loss_fn is not None else None
    return outputs, loss


def run_backward(work: BackwardWork) -> None:
    """Run the backward half; input grads land in `.grad` of the micro-batch's stage inputs.

    A loss is detached in place afterwards (as in the reference) so a caller that keeps it for
    logging does not keep its graph alive.
    """
    if work.loss is not None:
        work.loss.backward()
        work.loss.detach_()
        return
    pairs = [(t, g) for t, g in zip(work.outputs, work.output_grads) if g is not None and t.requires_grad]
    if pairs:
        tensors, grads = zip(*pairs)
        torch.autograd.backward(tensors, grads)


def serial_overlap(forward: ForwardWork, backward: BackwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The default: F, then B (no overlap). Same numbers as running the two actions apart."""
    result = run_forward(forward)
    run_backward(backward)
    return result


def backward_first_overlap(forward: ForwardWork, backward: BackwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """B, then F: a non-serial order, used to show results do not depend on the interleaving."""
    run_backward(backward)
    return run_forward(forward)


class ModuleOverlap:
    """Adapts a stage class's reference-style `overlapped_forward_backward` to `OverlapFn`.

    The hook is called as `cls.overlapped_forward_backward(module0, list(inputs0), criterion0,
    list(labels0), module1, loss1, list(outputs1), list(output_grads1))` with the reference's
    conventions: `labels0 == []` without a criterion, `outputs1 == output_grads1 == []` when
    `loss1` is given, and output pairs whose grad is None already dropped.
    """

    __slots__ = ("hook", "owner")

    def __init__(self, owner: type) -> None:
        self.owner = owner
        self.hook = getattr(owner, HOOK_NAME)
        _check_signature(self.hook, 8, f"{owner.__qualname__}.{HOOK_NAME}", _HOOK_SIGNATURE)

    def __call__(self, forward: ForwardWork, backward: BackwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]:
        pairs = [(t, g) for t, g in zip(backward.outputs, backward.output_grads) if g is not None]
        result = self.hook(
            forward.module,
            list(forward.inputs),
            forward.loss_fn,
            list(forward.labels),
            backward.module,
            backward.loss,
            [t for t, _ in pairs],
            [g for _, g in pairs],
        )
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                f"{self.owner.__qualname__}.{HOOK_NAME} must return (outputs0, loss0); got {type(result).__name__}"
            )
        outputs, loss = result
        return _as_tuple(outputs), loss

    def __repr__(self) -> str:
        return f"ModuleOverlap({self.owner.__qualname__})"


def resolve_overlap(module0: nn.Module, module1: nn.Module, registered: OverlapFn | None = None) -> OverlapFn:
    """Pick the function that runs F of `module0` paired with B of `module1`.

    Args:
        module0: stage module of the forward half.
        module1: stage module of the backward half.
        registered: an `OverlapFn` registered on the engine; wins when given.

    Returns:
        `registered`, else a `ModuleOverlap` for the modules' shared class hook, else `serial_overlap`.

    Raises:
        TypeError: `registered` does not take `(forward, backward)`, or the class hook does not
            take the reference's eight arguments.
    """
    if registered is not None:
        _check_signature(registered, 2, f"registered OverlapFn {registered!r}", "(forward, backward)")
        return registered
    cls0, cls1 = type(module0), type(module1)
    has0, has1 = hasattr(cls0, HOOK_NAME), hasattr(cls1, HOOK_NAME)
    if cls0 is cls1 and has0:
        return ModuleOverlap(cls0)
    if has0 or has1:
        warn_once(
            _log,
            f"{HOOK_NAME} is used only when both paired stages share a class; got {cls0.__qualname__} and "
            f"{cls1.__qualname__}, running them serially",
        )
    return serial_overlap


def _check_signature(fn: Callable[..., object], num_args: int, what: str, expected: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without metadata: trust the caller
        return
    try:
        signature.bind(*range(num_args))
    except TypeError as e:
        raise TypeError(f"{what}{signature} cannot be called with {num_args} arguments {expected}: {e}") from e


def _as_tuple(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
