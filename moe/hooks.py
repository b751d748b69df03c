"""Step-boundary integration of `MoELayer`s: functions for any training loop, and a DeepSpeed engine mixin.

One optimizer step of a model with MoE layers:

    forward/backward x GAS          home dW -> home .grad (like autograd); replica dW -> fp32 replica grads
                                    (dW possibly deferred by the W split)
    reduce_slot_grads(model)        replica grads -> their homes' .grad (before DeepSpeed reduces grads;
                                    no communication with R = 0)
    DeepSpeed gradient reduction    homes over the expert-DP group, the rest over the DP group
    optimizer.step()                updates homes (ZeRO-1 partitions them over the expert-DP group)
    end_step(model, stats)          one all-reduce of the load counts -> router bias update
                                    -> refresh_slots(model) (homes -> replica buffers; none with R = 0)
                                    -> the EPLB rebalancer (when moe.eplb.enabled) -> step callbacks

DeepSpeed 0.19.8 facts this relies on (runtime/engine.py, runtime/zero/stage_1_and_2.py):
* A parameter with `allreduce = False` and `group_name` is an expert parameter (`moe.utils.is_moe_param`);
  `buffered_allreduce_fallback` reduces it over `groups._get_expert_data_parallel_group(group_name)`
  divided by the full DP size, and ZeRO-1/2 partition its `'moe': True` param group
  (`configure_moe_param_groups`) over that group. All of this only happens with
  `engine.has_moe_layers`, which DeepSpeed sets for its own `MoE` class only: the mixin sets it.
* `set_deepspeed_parallelism()` is called on every module that has it (creates the `ep_size_P` groups).
* Gradients are reduced from `_backward_epilogue -> allreduce_gradients` at the accumulation boundary
  (ZeRO-0: `buffered_allreduce_fallback` reads `.grad`; ZeRO-1: `optimizer.reduce_gradients` reads
  `.grad`, or `.grad_accum` filled by per-parameter hooks). Home grads are set by hand, not by
  autograd, so no hook fires for them: `hand_grads_to_optimizer` does the hook's work
  (`DeepSpeedZeroOptimizer.process_gradients`, `BF16_Optimizer._update_hp_grad`).

`moe_engine_class(DeepSpeedEngine)` (or a pipeline engine class) returns the subclass that runs all of
this, saves and loads MoE checkpoints by logical expert (`dualmoe.moe.checkpoint.MoECheckpointMixin`:
every EP rank's homes, placements, biases, statistics) and, when the DeepSpeed JSON says
`"moe": {"eplb": {"enabled": true, ...}}`, builds a `Rebalancer` with those settings at the end of
`__init__` (`engine.moe_rebalancer`; one attached later with `attach_rebalancer` replaces it). It is
safe for models, or pipeline stages, without MoE layers (everything above is then skipped).
`initialize(...)` is `deepspeed.initialize` with that class for plain (non-pipeline) models. Pipeline
engines reduce through `_exec_reduce_grads` / `_bf16_reduce_grads` / `allreduce_gradients`, all three
of which first call `engine.moe_reduce_slot_grads()`; an engine that reduces gradients some other way
must call it itself (after the weight-grad queue has run).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from .checkpoint import MoECheckpointMixin
from .config import parse_moe_config
from .layer import MoELayer
from .stats import LoadStats

__all__ = [
    "MoEEngineMixin",
    "arm_slot_grad_reduce",
    "end_step",
    "hand_grads_to_optimizer",
    "initialize",
    "make_load_stats",
    "moe_engine_class",
    "moe_layers",
    "reduce_slot_grads",
    "refresh_slots",
    "update_router_bias",
]

logger = logging.getLogger(__name__)

StepCallback = Callable[[Any], None]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The `MoELayer`s of `model` in module order (the L axis of the load statistics)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def reduce_slot_grads(model: nn.Module) -> list[nn.Parameter]:
    """Sum every layer's slot gradients into its home parameters' `.grad`; zero the slot gradients.

    Collective over each layer's EP group; call once per step after the last backward (and after the
    weight-grad queue has run) and before any gradient reduction or clipping.

    Returns:
        The home parameters whose `.grad` was written.
    """
    params: list[nn.Parameter] = []
    for layer in moe_layers(model):
        params.extend(layer.reduce_slot_grads())
    return params


def arm_slot_grad_reduce(model: nn.Module) -> None:
    """Before the backward of a step's last micro-batch: each layer sends its replica gradients home as soon
    as that backward has passed it (`MoELayer.arm_slot_grad_reduce`); `reduce_slot_grads` then waits."""
    for layer in moe_layers(model):
        layer.arm_slot_grad_reduce()


def refresh_slots(model: nn.Module) -> None:
    """Copy home weights into every slot buffer (collective over each EP group); call after each step."""
    for layer in moe_layers(model):
        layer.refresh_slots()


def update_router_bias(model: nn.Module, load_LE: Tensor) -> None:
    """One aux-loss-free bias step per layer from the step's globally reduced counts [L, E]."""
    for layer, load_E in zip(moe_layers(model), load_LE, strict=True):
        layer.update_bias(load_E)


def make_load_stats(model: nn.Module) -> LoadStats | None:
    """`LoadStats` over the model's MoE layers with the window/EMA of their `eplb` config (None if none)."""
    layers = moe_layers(model)
    if not layers:
        return None
    eplb = layers[0].config.eplb
    return LoadStats(layers, window=eplb.window, ema_decay=0.9 if eplb.ema is None else eplb.ema,
                     group=layers[0].stats_group)


def end_step(model: nn.Module, stats: LoadStats | None) -> Tensor | None:
    """After an optimizer step: reduce load counts, update router biases, refresh slot buffers.

    Returns:
        The step's global load [L, E], or None without statistics (then biases are not updated).
    """
    load_LE = None
    if stats is not None:
        load_LE = stats.step()
        update_router_bias(model, load_LE)
    refresh_slots(model)
    return load_LE


def hand_grads_to_optimizer(optimizer: Any, params: list[nn.Parameter]) -> None:
    """Do for hand-written `.grad`s what DeepSpeed's per-parameter gradient hooks would have done.

    ZeRO-1/2 (`DeepSpeedZeroOptimizer`): `process_gradients` (fills `.grad_accum` when gradients
    accumulate in another dtype; reduces at once with overlap_comm or ZeRO-2). `BF16_Optimizer`: adds
    the grad into its fp32 gradient buffer and drops the bf16 one (so its epilogue does not add it
    twice). Other optimizers read `.grad` at reduction time and need nothing.
    """
    if not params or optimizer is None:
        return
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        index = {id(p): i for i, group in enumerate(optimizer.bit16_groups) for p in group}
        for p in params:
            optimizer.process_gradients(p, index[id(p)])
    elif isinstance(optimizer, BF16_Optimizer):
        index = {id(p): (i, j) for i, group in enumerate(optimizer.bf16_groups) for j, p in enumerate(group)}
        for p in params:
            optimizer._update_hp_grad(p, *index[id(p)], clear_lp_grads=False)
            p.grad = None


class MoEEngineMixin:
    """Mixin for `DeepSpeedEngine` (or a subclass) driving `MoELayer` step boundaries.

    Adds `engine.moe_stats` (`LoadStats`), `engine.moe_rebalancer` (a `Rebalancer` when the DeepSpeed
    JSON has `moe.eplb.enabled`, else None), `engine.moe_reduce_slot_grads()`, `engine.moe_after_step()` and
    `engine.add_moe_step_callback(fn)` (`fn(engine)` runs after each step's bias update, replica refresh
    and rebalance).
    """

    moe_stats: LoadStats | None = None
    moe_rebalancer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._moe_auto_rebalancer = self._make_rebalancer()
        if self._moe_auto_rebalancer is not None:
            self.moe_rebalancer = self._moe_auto_rebalancer

    def _make_rebalancer(self) -> Any:
        """A `Rebalancer` over this engine's MoE layers when the DeepSpeed JSON has `moe.eplb.enabled: true`
        (its `eplb` settings are used); collective over the layers' statistics group."""
        layers = getattr(self, "_moe_layers", None)
        section = parse_moe_config(getattr(getattr(self, "_config", None), "_param_dict", None) or {})
        if not layers or section is None or not section.eplb.enabled:
            return None
        from .rebalance import Rebalancer

        return Rebalancer(layers, stats=self.moe_stats, config=section.eplb, monitor=getattr(self, "monitor", None))

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)  # type: ignore[misc]
        self._moe_layers = moe_layers(self.module)
        from deepspeed.runtime.pipe.engine import PipelineEngine

        self._moe_pipeline = isinstance(self, PipelineEngine)
        self._moe_grads_ready = False
        self._moe_callbacks: list[StepCallback] = []
        if not self._moe_layers:
            return
        if not self.has_moe_layers:
            # DeepSpeed only detects its own MoE class; expert param groups and reduction need this flag.
            self.has_moe_layers = True
            self.num_experts.extend(layer.num_experts for layer in self._moe_layers)
        for layer in self._moe_layers:
            # The main loss is divided by GAS in engine.backward; aux-loss gradients must match.
            layer.aux_loss_grad_scale = 1.0 / self.gradient_accumulation_steps()
        self.moe_stats = make_load_stats(self.module)

    def add_moe_step_callback(self, fn: StepCallback) -> None:
        """Run `fn(engine)` after every optimizer step's statistics, bias update and slot refresh."""
        self._moe_callbacks.append(fn)

    def moe_reduce_slot_grads(self) -> None:
        """Slot grads -> home `.grad` (+ optimizer hand-off), once per step; idempotent until the step."""
        if self._moe_grads_ready or not getattr(self, "_moe_layers", None):
            return
        hand_grads_to_optimizer(self.optimizer, reduce_slot_grads(self.module))
        self._moe_grads_ready = True

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> Any:
        # The step's last micro-batch: replica gradients can go home during this backward. Not in pipeline
        # engines, whose stages run backward through their own instructions.
        if (getattr(self, "_moe_layers", None) and not getattr(self, "_moe_pipeline", False)
                and self.is_gradient_accumulation_boundary() and not self.inside_no_sync_ctxt):
            arm_slot_grad_reduce(self.module)
        return super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    def _backward_epilogue(self) -> None:
        if self.is_gradient_accumulation_boundary() and not self.inside_no_sync_ctxt:
            self.moe_reduce_slot_grads()
        super()._backward_epilogue()  # type: ignore[misc]

    def allreduce_gradients(self, *args: Any, **kwargs: Any) -> None:
        if self.is_gradient_accumulation_boundary():
            self.moe_reduce_slot_grads()
        super().allreduce_gradients(*args, **kwargs)  # type: ignore[misc]

    # Pipeline engines reduce at the step end through these (the bf16 one bypasses allreduce_gradients).
    def _exec_reduce_grads(self, *args: Any, **kwargs: Any) -> None:
        self.moe_reduce_slot_grads()
        super()._exec_reduce_grads(*args, **kwargs)  # type: ignore[misc]

    def _bf16_reduce_grads(self, *args: Any, **kwargs: Any) -> None:
        self.moe_reduce_slot_grads()
        super()._bf16_reduce_grads(*args, **kwargs)  # type: ignore[misc]

    def _take_model_step(self, *args: Any, **kwargs: Any) -> None:
        super()._take_model_step(*args, **kwargs)  # type: ignore[misc]
        self.moe_after_step()

    def moe_after_step(self) -> None:
        """Statistics, bias update, slot refresh, monitor events and callbacks (called after each step)."""
        self._moe_grads_ready = False
        if not getattr(self, "_moe_layers", None):
            return
        end_step(self.module, self.moe_stats)
        monitor = getattr(self, "monitor", None)
        if self.moe_stats is not None and monitor is not None and monitor.enabled and self.global_rank == 0:
            monitor.write_events(self.moe_stats.events(self.global_samples))
        auto = getattr(self, "_moe_auto_rebalancer", None)
        if auto is not None and self.moe_rebalancer is auto:  # not replaced by attach_rebalancer
            auto.step(self.global_steps, monitor_step=self.global_samples)
        for fn in self._moe_callbacks:
            fn(self)


class _MoECheckpoints(MoECheckpointMixin):
    """`MoECheckpointMixin` for engines with MoE layers; DeepSpeed's own checkpoints for the others."""

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_moe_layers", None):
            return super().save_checkpoint(*args, **kwargs)
        return super(MoECheckpointMixin, self).save_checkpoint(*args, **kwargs)  # type: ignore[misc]

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_moe_layers", None):
            return super().load_checkpoint(*args, **kwargs)
        return super(MoECheckpointMixin, self).load_checkpoint(*args, **kwargs)  # type: ignore[misc]


_ENGINE_CLASSES: dict[type, type] = {}


def moe_engine_class(base: type) -> type:
    """The MoE-aware engine class for `base` (`deepspeed.DeepSpeedEngine`, a pipeline engine, or a subclass).

    `base` with the MoE checkpoint mixin and `MoEEngineMixin` in front (one class per base): step
    boundaries (replica reduce/refresh, statistics, bias updates, the EPLB rebalancer when enabled),
    DeepSpeed's MoE parameter groups and reductions, and checkpoints that hold every EP rank's experts.
    Engines of models without `MoELayer`s behave exactly like `base`.
    """
    if issubclass(base, MoEEngineMixin) and issubclass(base, MoECheckpointMixin):
        return base
    if base not in _ENGINE_CLASSES:
        mixins = (MoEEngineMixin,) if issubclass(base, MoECheckpointMixin) else (_MoECheckpoints, MoEEngineMixin)
        if issubclass(base, MoEEngineMixin):
            mixins = (_MoECheckpoints,)
        _ENGINE_CLASSES[base] = type(f"MoE{base.__name__}", (*mixins, base), {})
    return _ENGINE_CLASSES[base]


@contextlib.contextmanager
def _engine_class_bound(module: Any, name: str, cls: type) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, cls)
    try:
        yield
    finally:
        setattr(module, name, old)


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """`deepspeed.initialize` whose engine (for a plain, non-pipeline model) is MoE-aware.

    Same arguments and return value as `deepspeed.initialize`.
    """
    import deepspeed

    cls = moe_engine_class(deepspeed.DeepSpeedEngine)
    # deepspeed.initialize looks `DeepSpeedEngine` up in its module globals at call time.
    with _engine_class_bound(deepspeed, "DeepSpeedEngine", cls):
        return deepspeed.initialize(*args, **kwargs)
