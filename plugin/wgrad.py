"""Zero-bubble weight-grad split: backward computes input grads now (I) and weight grads later (W).

A pipeline engine owns one `WeightGradQueue` and hands it to its stages (`install(stage, queue)`).
It brackets a backward with `queue.capture(key)`: every hooked GEMM in that backward returns its
input grad at once and parks its weight-grad work under `key`, which the engine runs later with
`queue.run(key)` (the schedule's W action). Outside a capture the same layers run a full backward,
bitwise equal to plain autograd (the grads go through autograd's own AccumulateGrad).

What is held, and why it is the minimum
---------------------------------------
For `y = x @ W.T + b`, dW = g.T @ x and db = g.sum(0) need two tensors: the layer input `x` and the
output grad `g = dL/dy`. A deferred Linear keeps one reference to each and nothing else:

* `x` is the tensor autograd saved for backward, unpacked once. Autograd drops its own reference
  when the node finishes, so after I the queue holds the only one: no duplicate, no clone. Under
  autocast it is the low-precision cast plain autograd saves too (never an fp32 copy).
* `g` arrives in the backward call; keeping it is the one new cost of a split.
* Nothing else: no autograd graph (torch's `stage_backward_input` retains the whole graph, every
  intermediate of the stage, until W), no weight copy (the autocast cast of the weight is redone
  at I rather than saved), no pre-allocated `param.grad` (the reference `LinearFunc` zero-fills
  `weight.grad` at B). x is saved only if the weight trains, the weight only if x needs a grad; a
  frozen weight with a trainable bias reduces db at I and holds that `[out]` vector only.

`held_bytes()` counts the distinct storages the queue keeps alive (a view counts its whole base):
for a sequential MLP it equals sum over Linears of (x bytes + g bytes), which the tests assert.
Measured on CPU for two transformer-ish blocks (T=512, H=256: LN, qkv, attention, o, LN, 4H MLP),
one micro-batch: autograd saves 17.5 MiB of activations; after I the split holds 16.0 MiB
(7.0 MiB of Linear inputs autograd had saved + 9.0 MiB of output grads) and no other saved tensor
survives; `stage_backward_input` keeps all 17.5 MiB plus 11.0 MiB of intermediate grads. Under
bf16 autocast: 9.5 MiB saved, 8.0 MiB held.

Accumulation semantics
----------------------
`run(key)` adds each grad into `param.grad` like AccumulateGrad: set when None, else in place. A
parameter hit by several GEMMs of one backward call (tied weights) gets their sum first, in
backward order, then one accumulation; separate backward calls under one key (retain_graph,
reentrant checkpointing) accumulate separately, as autograd does. Results match plain autograd
bitwise on CPU. Post-accumulate-grad hooks do not see deferred grads: autograd fires them during I
with `param.grad` untouched. Pass `on_accumulate` to hear about W accumulations.

Threads and streams
-------------------
On CUDA autograd runs backward nodes on a device thread, so capture state lives on the queue
object (which every hooked module references), never in a thread-local or contextvar; one capture
may be open per queue at a time. W reuses tensors produced on B's stream: run it on that stream
(or make its stream wait and `record_stream` the held tensors).

`install` and module copies
---------------------------
`install` sets an instance attribute `forward` (a `_SplitLinearForward`) on each stock `nn.Linear`
(subclasses that override `forward` are left alone): parameters, buffers, `state_dict` keys and the
class stay as they were, and forward hooks still run. `copy.deepcopy` of a hooked module gives a
hooked copy bound to the *same* queue (a queue is a runtime service, like a process group).
Pickling keeps the hook but the queue unpickles empty and idle. Under `torch.compile` the hooked
forward is excluded from tracing (`torch.compiler.disable`, applied at the first `install`): each
hooked Linear is a graph break and runs eagerly, so the split's semantics never get baked into a
trace; uninstall before compiling for speed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from dualmoe.errors import ScheduleError
from dualmoe.log import warn_once
from torch import Tensor, nn

__all__ = [
    "SupportsWeightGradQueue",
    "WeightGradQueue",
    "accumulate_grad",
    "defer_or_run",
    "install",
    "split_linear",
    "uninstall",
]

_log = logging.getLogger(__name__)


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add `grad` into `param.grad` like autograd's AccumulateGrad (set when None, else in place).

    Args:
        param: a leaf tensor (usually an `nn.Parameter`).
        grad: same shape as `param`; cast to `param.dtype` if it differs.
    """
    with torch.no_grad():
        if grad.dtype != param.dtype:
            grad = grad.to(param.dtype)
        if param.grad is None:
            # Autograd steals a fresh gradient when its layout matches the parameter's.
            param.grad = grad if grad.stride() == param.stride() else grad.clone(memory_format=torch.preserve_format)
        else:
            param.grad.add_(grad)


@dataclass(slots=True)
class _Closure:
    """Opaque deferred work from `defer_or_run`: `fn` does its own accumulation."""

    fn: Callable[[], None]
    held: tuple[Tensor, ...]


@dataclass(slots=True)
class _LinearWork:
    """Deferred dW/db of one Linear call: holds the input x and the output grad g, nothing else.

    With a frozen weight only db is owed; it is reduced at I and `g` holds db itself ([out]).
    """

    x: Tensor | None  # None when the weight is frozen
    g: Tensor
    weight: Tensor | None  # None when frozen
    bias: Tensor | None  # None when absent or frozen
    g_is_bias_grad: bool = False  # True once g was reduced to db
    graph_task: int = -1  # autograd's id of the backward call that produced g
    versions: tuple[int, ...] = ()

    @property
    def held(self) -> tuple[Tensor, ...]:
        return (self.g,) if self.x is None else (self.x, self.g)

    def stamp(self) -> None:
        self.versions = tuple(t._version for t in self.held)

    def check_unchanged(self) -> None:
        if tuple(t._version for t in self.held) != self.versions:
            raise RuntimeError(
                "a tensor held for a deferred weight grad (layer input or output grad) was modified in place "
                "after its backward; keep micro-batch buffers untouched until their W has run"
            )

    def weight_grad(self) -> Tensor | None:
        if self.weight is None or self.x is None:
            return None
        # Same op and operand order as autograd's Linear backward, hence bitwise equal grads.
        g_2d, x_2d = self.g.reshape(-1, self.g.shape[-1]), self.x.reshape(-1, self.x.shape[-1])
        return torch.mm(g_2d.t(), x_2d).to(self.weight.dtype)

    def bias_grad(self) -> Tensor | None:
        if self.bias is None:
            return None
        if self.g_is_bias_grad:
            return self.g
        return self.g.reshape(-1, self.g.shape[-1]).sum(0).to(self.bias.dtype)


_Work = _Closure | _LinearWork


class WeightGradQueue:
    """Deferred weight-grad work, grouped by key (e.g. `(stage, microbatch)`); one per engine.

    Args:
        on_accumulate: called as `on_accumulate(param)` after `run` adds a grad into `param.grad`
            (where an optimizer would otherwise rely on post-accumulate-grad hooks).
    """

    def __init__(self, *, on_accumulate: Callable[[Tensor], None] | None = None) -> None:
        self.on_accumulate = on_accumulate
        self._work: dict[Hashable, list[_Work]] = {}
        self._capture_key: Hashable | None = None
        self._capturing = False
        # storage id -> [bytes, number of held references]; makes held_bytes() O(1) and exact.
        self._storages: dict[tuple[str, int], list[int]] = {}
        self._held_bytes = 0
        self._peak_held_bytes = 0
        # Backward may run on an autograd device thread while the engine thread reads the queue.
        self._lock = threading.Lock()

    # ---- capture --------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """True while a `capture(key)` block is open (read by backward code on any thread)."""
        return self._capturing

    @contextlib.contextmanager
    def capture(self, key: Hashable) -> Iterator[None]:
        """Defer the weight grads of every backward run inside this block under `key`.

        `key` is registered even if nothing gets deferred, so `run(key)` is then a no-op.

        Raises:
            RuntimeError: a capture is already open on this queue.
        """
        if self._capturing:
            raise RuntimeError(
                f"WeightGradQueue.capture({key!r}) while capture({self._capture_key!r}) is open; "
                "captures do not nest (close the first backward's capture before the next)"
            )
        self._work.setdefault(key, [])
        self._capture_key, self._capturing = key, True
        try:
            yield
        finally:
            self._capture_key, self._capturing = None, False

    def defer_or_run(self, fn: Callable[[], None], held: tuple[Tensor, ...] = ()) -> None:
        """Park `fn` under the open capture's key (accounting `held`), or run it now outside one."""
        if not self._capturing:
            fn()
            return
        self._add(_Closure(fn, tuple(held)))

    def _add(self, work: _Work) -> None:
        with self._lock:
            self._work[self._capture_key].append(work)
            self._account(work.held, +1)

    def _release(self, work: _Work) -> None:
        with self._lock:
            self._account(work.held, -1)

    def _account(self, held: tuple[Tensor, ...], sign: int) -> None:
        for t in held:
            sid = _storage_id(t)
            entry = self._storages.get(sid)
            if sign > 0 and entry is None:
                nbytes = t.untyped_storage().nbytes()
                self._storages[sid] = [nbytes, 1]
                self._held_bytes += nbytes
            elif sign > 0:
                entry[1] += 1
            else:
                entry[1] -= 1
                if entry[1] == 0:
                    self._held_bytes -= entry[0]
                    del self._storages[sid]
        self._peak_held_bytes = max(self._peak_held_bytes, self._held_bytes)

    # ---- W ----------------------------------------------------------------------------------
    def run(self, key: Hashable) -> None:
        """Compute and accumulate into `param.grad` every weight grad deferred under `key`.

        Work runs in backward order and is freed as it goes.

        Raises:
            ScheduleError: `key` was never captured or has already run.
        """
        if key not in self._work:
            pending = ", ".join(repr(k) for k in self._work) or "none"
            raise ScheduleError(
                f"W for key {key!r}: no backward was captured under it (or its W already ran); "
                f"pending keys: {pending}"
            )
        if self._capturing and self._capture_key == key:
            raise ScheduleError(f"W for key {key!r} while its backward is still being captured")
        with self._lock:
            works = self._work.pop(key)
        # A parameter hit by several GEMMs of one backward call is summed first, as autograd's input
        # buffer does; separate backward calls (retain_graph, reentrant checkpoints) accumulate apart.
        remaining: dict[tuple[int, int], int] = {}
        for work in works:
            if isinstance(work, _LinearWork):
                for p in (work.weight, work.bias):
                    if p is not None:
                        slot = (id(p), work.graph_task)
                        remaining[slot] = remaining.get(slot, 0) + 1
        partial: dict[tuple[int, int], Tensor] = {}
        works.reverse()  # pop() from the end = backward order, freeing each item as it runs
        while works:
            work = works.pop()
            try:
                if isinstance(work, _Closure):
                    work.fn()
                    continue
                work.check_unchanged()
                # W runs in the dtypes captured at B, whatever autocast region the engine is in.
                with torch.no_grad(), _autocast_off(work.g.device.type):
                    if work.weight is not None:
                        self._collect(work.weight, work.weight_grad(), work.graph_task, remaining, partial)
                    if work.bias is not None:
                        self._collect(work.bias, work.bias_grad(), work.graph_task, remaining, partial)
            finally:
                self._release(work)
            del work

    def _collect(
        self,
        param: Tensor,
        grad: Tensor,
        graph_task: int,
        remaining: dict[tuple[int, int], int],
        partial: dict[tuple[int, int], Tensor],
    ) -> None:
        slot = (id(param), graph_task)
        remaining[slot] -= 1
        if slot in partial:
            grad = partial.pop(slot) + grad
        if remaining[slot] > 0:
            partial[slot] = grad
            return
        accumulate_grad(param, grad)
        if self.on_accumulate is not None:
            self.on_accumulate(param)

    # ---- bookkeeping ---------------------------------------------------------------------
    def pending_keys(self) -> list[Hashable]:
        """Keys captured and not yet run, in capture order."""
        return list(self._work)

    def __len__(self) -> int:
        """Number of pending keys (W actions still owed)."""
        return len(self._work)

    def clear(self) -> None:
        """Drop every pending work item without running it and free what it held."""
        with self._lock:
            for works in self._work.values():
                for work in works:
                    self._account(work.held, -1)
            self._work.clear()

    def held_bytes(self) -> int:
        """Bytes of the distinct tensor storages kept alive by pending work."""
        return self._held_bytes

    def peak_held_bytes(self) -> int:
        """Largest `held_bytes()` seen since construction or `reset_peak()`."""
        return self._peak_held_bytes

    def reset_peak(self) -> None:
        """Restart the peak at the current `held_bytes()`."""
        self._peak_held_bytes = self._held_bytes

    # A queue is a runtime service: copies of a hooked module share it; pickles get a fresh one.
    def __deepcopy__(self, memo: dict[int, object]) -> WeightGradQueue:
        return self

    def __reduce__(self) -> tuple[type[WeightGradQueue], tuple[()]]:
        return (WeightGradQueue, ())

    def __repr__(self) -> str:
        return f"WeightGradQueue(pending={len(self)}, held_bytes={self._held_bytes}, capturing={self._capturing})"


def _storage_id(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def defer_or_run(queue: WeightGradQueue | None, fn: Callable[[], None], held: tuple[Tensor, ...] = ()) -> None:
    """The hook for any custom autograd backward: defer `fn` if `queue` is capturing, else run it.

    `fn` computes weight grads and accumulates them itself (use `accumulate_grad`).

    Args:
        queue: the module's queue, or None when no engine installed one (then `fn` runs now).
        fn: the weight-grad work; it must not need the autograd graph.
        held: the tensors `fn` keeps alive, for `held_bytes()` accounting.
    """
    if queue is None:
        fn()
    else:
        queue.defer_or_run(fn, held)


class _SplitLinearFn(torch.autograd.Function):
    """F.linear whose backward returns dx now and, while the queue captures, defers dW and db."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        queue: WeightGradQueue,
        compute_dtype: torch.dtype | None,
    ) -> Tensor:
        ctx.queue, ctx.compute_dtype = queue, compute_dtype
        # Parameter identity for W: saved tensors may unpack as other objects (checkpointing, offload hooks).
        ctx.weight_param, ctx.bias_param = weight, bias
        # Save exactly what plain autograd saves: x only for dW, the weight only for dx.
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        if compute_dtype is None:
            return F.linear(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, _cast(weight, compute_dtype), _cast(bias, compute_dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        queue, compute_dtype = ctx.queue, ctx.compute_dtype
        grad_x = None
        with _autocast_off(g.device.type):
            if need_x:
                # Recast rather than save the autocast weight copy: one cast per I, no weight bytes held.
                w = weight if compute_dtype is None else _cast(weight, compute_dtype)
                grad_x = torch.mm(g.reshape(-1, g.shape[-1]), w).reshape(*g.shape[:-1], w.shape[-1])
            if not (need_w or need_b):
                return grad_x, None, None, None, None
            work = _LinearWork(
                x=x, g=g, weight=ctx.weight_param if need_w else None, bias=ctx.bias_param if need_b else None
            )
            if queue.capturing and not need_w:
                work.g, work.g_is_bias_grad = work.bias_grad(), True  # hold db ([out]), not g ([..., out])
            if queue.capturing:
                work.graph_task = torch._C._current_graph_task_id()
                work.stamp()
                queue._add(work)
                return grad_x, None, None, None, None
            # Full B: hand the grads to autograd so AccumulateGrad (and its hooks) behave as usual.
            return grad_x, work.weight_grad(), work.bias_grad(), None, None


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for `device_type`; no context object at all when it is off already (host time)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Autocast casts floating tensors other than float64 to the low-precision dtype.
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def split_linear(x: Tensor, weight: Tensor, bias: Tensor | None, queue: WeightGradQueue | None) -> Tensor:
    """`F.linear(x, weight, bias)` whose weight/bias grads go through `queue` (deferred while capturing).

    Forward outputs are bitwise those of `F.linear` (also under autocast, where the weight grad is
    computed in the autocast dtype and cast to the parameter's dtype, as autograd does).

    Args:
        x: input `[..., in_features]`; need not require grad (first layer).
        weight: `[out_features, in_features]`; frozen (requires_grad False) means no W work.
        bias: `[out_features]` or None.
        queue: the engine's queue; None means plain `F.linear`.

    Returns:
        `[..., out_features]`.
    """
    if queue is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    if not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    compute_dtype = _autocast_dtype(x)
    if compute_dtype is not None:
        # Cast x outside the Function so its grad flows back through autograd's own cast node.
        x = _cast(x, compute_dtype)
    return _SplitLinearFn.apply(x, weight, bias, queue, compute_dtype)


@runtime_checkable
class SupportsWeightGradQueue(Protocol):
    """A module with its own weight GEMMs (e.g. MoE experts) that defers W through a queue.

    Its custom backward calls `defer_or_run(self_queue, fn, held)`; `install` hands it the engine's
    queue and `uninstall` hands it None (then W runs inline).
    """

    def set_weight_grad_queue(self, queue: WeightGradQueue | None) -> None: ...


class _SplitLinearForward:
    """Instance-level `forward` of a hooked `nn.Linear`: `split_linear` with the module's parameters."""

    __slots__ = ("linear", "queue")

    def __init__(self, linear: nn.Linear, queue: WeightGradQueue) -> None:
        self.linear = linear
        self.queue = queue

    def __call__(self, input: Tensor) -> Tensor:  # same parameter name as nn.Linear.forward
        if _compiling():
            return _eager_split_linear(input, self.linear.weight, self.linear.bias, self.queue)
        return split_linear(input, self.linear.weight, self.linear.bias, self.queue)

    def __getstate__(self) -> tuple[nn.Linear, WeightGradQueue]:
        return (self.linear, self.queue)

    def __setstate__(self, state: tuple[nn.Linear, WeightGradQueue]) -> None:
        self.linear, self.queue = state


def _compiling() -> bool:
    return False  # replaced by torch.compiler.is_compiling at the first install


_eager_split_linear = split_linear  # replaced by a compile-disabled split_linear at the first install


def _exclude_from_compile() -> None:
    # Dynamo would bake `queue.capturing` in at trace time (and inductor changes the bits), so a
    # hooked forward always runs eagerly: while tracing, the call goes through a `torch.compiler.disable`d
    # split_linear (a graph break). Eager calls skip that wrapper, ~10 us of host time per Linear call.
    # Done on first install: importing torch._dynamo costs ~1 s.
    global _compiling, _eager_split_linear
    if _eager_split_linear is split_linear:
        _compiling = torch.compiler.is_compiling
        _eager_split_linear = torch.compiler.disable(split_linear)


def _is_stock_linear(module: nn.Module) -> bool:
    # Subclasses that override forward (LoRA, quantized, ...) have their own semantics: leave them.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def install(module: nn.Module, queue: WeightGradQueue) -> int:
    """Route the weight grads of every stock `nn.Linear` (and queue-aware submodule) in `module` via `queue`.

    Idempotent; a module already hooked to another queue is re-pointed. Parameters, `state_dict`
    keys and classes are unchanged (see the module docstring for deepcopy/pickle/compile).

    Args:
        module: a stage module (searched recursively, itself included).
        queue: the engine's `WeightGradQueue`.

    Returns:
        Number of submodules now using `queue` (hooked Linears plus `set_weight_grad_queue` modules).
    """
    _exclude_from_compile()
    count = 0
    for sub in module.modules():
        if isinstance(sub, SupportsWeightGradQueue):
            sub.set_weight_grad_queue(queue)
            count += 1
        elif _is_stock_linear(sub):
            current = sub.__dict__.get("forward")
            if current is not None and not isinstance(current, _SplitLinearForward):
                warn_once(_log, f"install: {type(sub).__name__} already has an instance forward; left unhooked")
                continue
            sub.forward = _SplitLinearForward(sub, queue)
            count += 1
    return count


def uninstall(module: nn.Module) -> int:
    """Undo `install`: hooked Linears get their class forward back, queue-aware modules get None.

    Returns:
        Number of submodules unhooked.
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, SupportsWeightGradQueue):
            sub.set_weight_grad_queue(None)
            count += 1
        elif isinstance(sub.__dict__.get("forward"), _SplitLinearForward):
            del sub.forward
            count += 1
    return count
