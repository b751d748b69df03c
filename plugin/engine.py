"""The schedule executor: a DeepSpeed `PipelineEngine` that runs a lowered schedule IR, one action at a time.

DeepSpeed's `train_batch` is kept (timers, monitor events, steps_per_print); it calls `_train_schedule()`,
which here returns this rank's lowered `RankProgram`, and `_exec_schedule(program)`, which walks it:

    for each action:  record_function("dualmoe/F/s3/mb1"): _HANDLERS[action.type](self, action); comm.progress()
    step end:         finish sends -> all ranks agree -> sum shared-copy grads -> DeepSpeed grad
                      reduction (DP) -> DeepSpeed optimizer step (clipping, fp16 skips, LR scheduler)

Handlers, one per action type:
    F       inputs (data | local hand-over | received), stage forward, loss on a path's last stage
    B / I   backward from the loss or the received output grads; I defers weight grads (WeightGradQueue)
    W       runs the deferred weight grads of (stage, micro-batch)
    FB      forward of one micro-batch and backward of another through the overlap function (a pair that
            would run serially is executed as F, its SEND_F, then B: `program.split_serial_pairs`)
    SEND_*  / RECV_*  non-blocking messages (`PipeComm`); a RECV registers the receive, its payload is posted
            when used (`pipeline.recv_posting`; on CUDA it starts behind the compute queued before it); with
            `pipeline.static_shapes` (default "auto": static unless the PipelineModule says dynamic_shape=True)
            shapes travel in the first step only

Before the first step every p2p connection of the schedule is set up, pair by pair in one global order
(`PipeComm.warm_up`): NCCL's lazy set-up inside a batched p2p blocks until the peer joins, which deadlocked
DualPipe, whose two ranks both start by sending.

The engine does no schedule arithmetic: `RankProgram` answers where inputs and grads come from.
Loss semantics equal DeepSpeed's: each micro-batch's loss is divided by gradient_accumulation_steps
before backward, and `train_batch` returns the mean over micro-batches, averaged over data parallel.
On any error the rank logs its schedule with the failing step marked, tells the other ranks through
the store (`AbortSignal`) and raises; see `dualmoe.failure`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from torch import Tensor

from .checkpoint import CheckpointMixin
from .config import PipelineConfig
from .engine_steps import StepMixin
from .failure import AbortSignal, default_store
from .groups import Groups
from .microbatch import DataFeed, StepState
from .overlap import BackwardWork, ForwardWork, OverlapFn, run_backward, run_forward
from .p2p import PipeComm
from .program import RankProgram, build_program, message_links, split_serial_pairs
from .schedule.ir import Action, ActionType
from .stage import StageLayout
from .wgrad import WeightGradQueue, install

__all__ = ["DualPipeEngine", "EnginePlan", "ExecutionPlan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnginePlan:
    """Everything `initialize` decided before building the engine.

    Args:
        config: our validated `"pipeline"` settings.
        layout: the layer cut and stage placement.
        groups: this rank's process groups.
        engine_id: a key prefix unique to this engine (same on every rank).
    """

    config: PipelineConfig
    layout: StageLayout
    groups: Groups
    engine_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionPlan:
    """What `_exec_schedule` walks for one program, prepared once: actions, their handlers and names.

    Args:
        actions: the program's actions, serial F&B pairs split (`split_serial_pairs`).
        handlers: the handler of each action.
        names: each action's profiler event name.
        texts: each action's position for messages ("action 0F3 (#5)").
        links: (sender, receiver) pp-rank pairs of every message of the schedule (all ranks).
    """

    actions: tuple[Action, ...]
    handlers: tuple[Callable[[DualPipeEngine, Action], None], ...]
    names: tuple[str, ...]
    texts: tuple[str, ...]
    links: tuple[tuple[int, int], ...]


def _hand_over(t: Tensor) -> Tensor:
    """A stage output as the next stage's input on the same rank: same storage, a new autograd leaf."""
    return t.detach().requires_grad_(t.requires_grad)


class DualPipeEngine(StepMixin, CheckpointMixin, PipelineEngine):
    """Runs `plan.config.schedule` over a `PipelineStages` module; built by `dualmoe.initialize`.

    Args:
        plan: the layout, groups and settings (keyword only); every other argument is PipelineEngine's.
    """

    def __init__(self, *args: Any, plan: EnginePlan, **kwargs: Any) -> None:
        # Read by set_dataloader(), which PipelineEngine.__init__ calls when given training_data.
        self._plan = plan
        self._programs: dict[tuple[bool, int], RankProgram] = {}
        super().__init__(*args, **kwargs)
        cfg, groups = plan.config, plan.groups
        self._split = cfg.split_backward
        self._queue = WeightGradQueue()
        if self._split:
            install(self.module, self._queue)
        where = f"rank {groups.global_rank} (pp {groups.pp_rank}, dp {groups.dp_rank})"
        self._abort = AbortSignal(default_store(), prefix=f"dualmoe/{plan.engine_id}",
                                  num_ranks=groups.pp_size * groups.dp_size, timeout_s=cfg.timeout_s, where=where,
                                  leader=groups.pp_rank == 0 and groups.dp_rank == 0)
        static = cfg.static_shapes if isinstance(cfg.static_shapes, bool) else \
            not getattr(self.module, "dynamic_shape", False)
        self._comm = PipeComm(groups, device=self.device, abort=self._abort, static_shapes=static,
                              post_ahead=cfg.recv_posting == "ahead",
                              recv_behind_compute=cfg.recv_posting == "at_use")
        # Every p2p connection now, in one global order: NCCL's lazy set-up could otherwise deadlock.
        self._comm.warm_up(message_links(self._train_schedule().schedule))
        self._registered_overlap: OverlapFn | None = None
        self._overlaps: dict[tuple[int, int], OverlapFn] = {}
        self._plans: dict[tuple[bool, int], ExecutionPlan] = {}
        self._program: RankProgram | None = None
        self._state = StepState()
        self._feed: DataFeed | None = None
        self._context = ""
        self._return_logits = False
        self._compute_loss = True

    # ---- DeepSpeed hooks -----------------------------------------------------------------------
    def _program_for(self, train: bool, num_microbatches: int) -> RankProgram:
        key = (train, num_microbatches)
        if key not in self._programs:
            groups = self._plan.groups
            self._programs[key] = build_program(self._plan.config.schedule, groups.pp_size, num_microbatches,
                                                groups.pp_rank, train=train)
        return self._programs[key]

    def _train_schedule(self) -> RankProgram:
        return self._program_for(True, self.micro_batches)

    def _inference_schedule(self, micro_batches: int) -> RankProgram:
        return self._program_for(False, micro_batches)

    def _loss_stage_global_rank(self) -> int:
        program = self._program_for(True, self.micro_batches)
        return self._plan.groups.to_global(program.loss_ranks()[0])

    def set_dataloader(self, loader: Any) -> None:
        """Keep `loader` on the ranks that read data in this schedule (see `dualmoe.microbatch`)."""
        if self._reads_data():
            self.training_dataloader = loader
            self.data_iterator = iter(loader)

    def set_dataiterator(self, iterator: Iterator[Any] | None) -> None:
        """Keep `iterator` on the ranks that read data in this schedule."""
        if self._reads_data():
            self.training_dataloader = None
            self.data_iterator = iterator

    def _reads_data(self) -> bool:
        return self._train_schedule().loads_data()

    def register_overlap(self, fn: OverlapFn | None) -> None:
        """Use `fn` for every overlapped F&B pair (None: the stage class hook, else serial)."""
        self._registered_overlap = fn
        self._overlaps.clear()
        self._plans.clear()

    def destroy(self) -> None:
        """Stop the p2p waiter threads, then DeepSpeed's cleanup."""
        self._comm.close()
        super().destroy()

    @property
    def micro_batch_losses(self) -> dict[int, Tensor]:
        """Detached loss of every micro-batch whose loss this rank computed in the last step."""
        return dict(self._state.loss_values)

    # ---- the executor --------------------------------------------------------------------------
    def _execution_plan(self, program: RankProgram) -> ExecutionPlan:
        key = (program.train, program.num_microbatches)
        if key not in self._plans:
            from .overlap import serial_overlap
            from .tracing import action_event_name

            actions = split_serial_pairs(program.actions, lambda a: self._overlap_for(*a.pair) is serial_overlap)
            self._plans[key] = ExecutionPlan(
                actions=actions, handlers=tuple(self._HANDLERS[a.type] for a in actions),
                names=tuple(action_event_name(a) for a in actions),
                texts=tuple(f"action {a} (#{step})" for step, a in enumerate(actions)),
                links=message_links(program.schedule))
        return self._plans[key]

    def _exec_schedule(self, program: RankProgram) -> None:
        """Run `program`'s actions, then (training) the step end: grad sync and optimizer step."""
        plan = self._execution_plan(program)
        self._comm.warm_up(plan.links)  # a no-op unless this program uses a connection not set up yet
        self._comm.start_step(train=program.train)
        self._program, self._state = program, StepState()
        self._feed = DataFeed(self.data_iterator, num_microbatches=program.num_microbatches,
                              device=self.device, batch_fn=self.batch_fn)
        self.fwd_outputs = []
        if program.train:
            self.tput_timer.start()
        record, progress, steps = torch.profiler.record_function, self._comm.progress, self.global_steps
        for step, (action, handler, name) in enumerate(zip(plan.actions, plan.handlers, plan.names)):
            self._context = f"step {steps}, {plan.texts[step]}"
            try:
                with record(name):
                    handler(self, action)
                progress()
            except Exception as err:
                self._fail(plan.actions, step, action, err)
        self._context = f"step {self.global_steps}, end of step"
        try:
            self._finish_step(program)
        except Exception as err:
            self._fail(plan.actions, None, None, err)

    def _stage_fn(self, stage: int) -> torch.nn.Module:
        return self.module.stages[stage]

    def _forward_work(self, f: Action) -> ForwardWork:
        program, state, key = self._program, self._state, (f.stage, f.microbatch)
        source = program.input_source(f.stage)
        if source == "data":
            inputs = self._feed.inputs(f.microbatch)
        elif source == "local":
            prev = (program.schedule.prev_stage(f.stage), f.microbatch)
            outs = state.outputs[prev] if program.train else state.outputs.pop(prev)
            inputs = tuple(_hand_over(t) for t in outs)
        else:
            inputs = self._comm.wait_recv(("F", program.schedule.prev_stage(f.stage), f.microbatch),
                                          context=self._context)
        if program.train:
            state.inputs[key] = inputs
        loss_fn = self._loss_fn(f.microbatch) if program.schedule.is_last(f.stage) else None
        return ForwardWork(module=self._stage_fn(f.stage), inputs=inputs, loss_fn=loss_fn)

    def _loss_fn(self, microbatch: int) -> Callable[..., Tensor]:
        labels, user_fn = self._feed.labels(microbatch), self.module.loss_fn
        compute = self._compute_loss and user_fn is not None

        def loss(*outputs: Tensor) -> Tensor:
            out = outputs[0] if len(outputs) == 1 else outputs
            return user_fn(out, labels) if compute else out

        return loss

    def _forward_done(self, f: Action, outputs: tuple[Tensor, ...], loss: Tensor | None) -> None:
        state = self._state
        if loss is None:
            state.outputs[(f.stage, f.microbatch)] = outputs
            return
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn returned {type(loss).__name__}; the schedule engine needs one tensor")
        state.loss_values[f.microbatch] = loss.detach()
        if self._program.train:
            state.losses[f.microbatch] = loss
        if self._return_logits:
            state.logits[f.microbatch] = outputs[0] if len(outputs) == 1 else outputs

    def _scale_loss(self, loss: Tensor) -> Tensor:
        """Divide by gradient_accumulation_steps, then apply the fp16 loss scale the optimizer will divide by.

        ZeRO optimizers and torch autocast's grad scaler scale as `DeepSpeedEngine.backward` does. ZeRO-0 fp16
        (FP16_Optimizer / FP16_UnfusedOptimizer) scales as those optimizers' own `backward()` does (`cur_scale`,
        or the external scale): DeepSpeed 0.19.8's `engine.backward` skips that call, so its step() divides grads
        that were never scaled by the loss scale (deepspeedai/DeepSpeed#8393); here updates equal fp32's.
        """
        loss = loss / self.gradient_accumulation_steps()
        opt = self.optimizer
        if isinstance(opt, ZeROOptimizer):
            return opt.scale_if_loss(loss)
        if self.torch_autocast_z0_gradscaler is not None:
            return self.torch_autocast_z0_gradscaler.scale(loss)
        scale_cfg = getattr(opt, "loss_scale_config", None)  # FP16_Optimizer / FP16_UnfusedOptimizer
        if scale_cfg is not None:
            return opt.external_loss_scale * loss if opt.custom_loss_scaler else loss.float() * scale_cfg.cur_scale
        return loss

    def _backward_work(self, b: Action) -> BackwardWork:
        program, state, key = self._program, self._state, (b.stage, b.microbatch)
        source = program.grad_source(b.stage)
        module = self._stage_fn(b.stage)
        if source == "loss":
            return BackwardWork(module=module, loss=self._scale_loss(state.losses.pop(b.microbatch)))
        outputs = state.outputs.pop(key)
        if source == "local":
            grads = state.output_grads.pop(key)
        else:
            grads = self._comm.wait_recv(("B", program.schedule.next_stage(b.stage), b.microbatch),
                                         context=self._context)
        return BackwardWork(module=module, outputs=outputs, output_grads=grads)

    def _backward_done(self, b: Action) -> None:
        program, state, key = self._program, self._state, (b.stage, b.microbatch)
        inputs = state.inputs.pop(key)
        source = program.input_source(b.stage)
        if source != "data":
            grads = tuple(t.grad if t.requires_grad else None for t in inputs)
            if source == "local":
                state.output_grads[(program.schedule.prev_stage(b.stage), b.microbatch)] = grads
            else:
                state.input_grads[key] = grads
        self._after_grads()

    @contextlib.contextmanager
    def _backward_scope(self, b: Action) -> Iterator[None]:
        """Silence DeepSpeed's post-backward hooks; capture weight grads for an I when splitting."""
        self._running_engine_backward = True
        try:
            if b.type is ActionType.I and self._split:
                with self._queue.capture((b.stage, b.microbatch)):
                    yield
            else:
                yield
        finally:
            self._running_engine_backward = False

    def _overlap_for(self, f: Action, b: Action) -> OverlapFn:
        from .overlap import resolve_overlap, serial_overlap

        key = (f.stage, b.stage)
        if key not in self._overlaps:
            self._overlaps[key] = (resolve_overlap(self._stage_fn(f.stage), self._stage_fn(b.stage),
                                                   self._registered_overlap)
                                   if self._plan.config.overlap else serial_overlap)
        return self._overlaps[key]

    # ---- handlers (one per action type) ----------------------------------------------------------
    def _exec_f(self, action: Action) -> None:
        work = self._forward_work(action)
        with autocast_if_enabled(self):
            outputs, loss = run_forward(work)
        self._forward_done(action, outputs, loss)

    def _exec_b(self, action: Action) -> None:
        work = self._backward_work(action)
        with self._backward_scope(action):
            run_backward(work)
        self._backward_done(action)

    def _exec_w(self, action: Action) -> None:
        if self._split:
            self._queue.run((action.stage, action.microbatch))
            self._after_grads()

    def _exec_fb(self, action: Action) -> None:
        f, b = action.pair
        forward, backward = self._forward_work(f), self._backward_work(b)
        with autocast_if_enabled(self), self._backward_scope(b):
            outputs, loss = self._overlap_for(f, b)(forward, backward)
        self._forward_done(f, outputs, loss)
        self._backward_done(b)

    def _exec_send_f(self, action: Action) -> None:
        key = (action.stage, action.microbatch)
        outputs = self._state.outputs[key] if self._program.train else self._state.outputs.pop(key)
        self._comm.send(("F", *key), self._program.next_rank(action.stage), outputs)

    def _exec_recv_f(self, action: Action) -> None:
        prev = self._program.schedule.prev_stage(action.stage)
        self._comm.post_recv(("F", prev, action.microbatch), self._program.prev_rank(action.stage))

    def _exec_send_b(self, action: Action) -> None:
        key = (action.stage, action.microbatch)
        self._comm.send(("B", *key), self._program.prev_rank(action.stage), self._state.input_grads.pop(key))

    def _exec_recv_b(self, action: Action) -> None:
        nxt = self._program.schedule.next_stage(action.stage)
        self._comm.post_recv(("B", nxt, action.microbatch), self._program.next_rank(action.stage))

    _HANDLERS: ClassVar[dict[ActionType, Callable[[DualPipeEngine, Action], None]]] = {
        ActionType.F: _exec_f,
        ActionType.B: _exec_b,
        ActionType.I: _exec_b,
        ActionType.W: _exec_w,
        ActionType.FB: _exec_fb,
        ActionType.SEND_F: _exec_send_f,
        ActionType.RECV_F: _exec_recv_f,
        ActionType.SEND_B: _exec_send_b,
        ActionType.RECV_B: _exec_recv_b,
    }

    def train_batch(self, data_iter: Iterator[Any] | None = None) -> Tensor:
        """DeepSpeed's `train_batch` (mean loss over micro-batches and DP); also logs the step time.

        Args:
            data_iter: yields `(inputs, labels)` per micro-batch (see `dualmoe.microbatch`).

        Returns:
            The mean loss of the step, on every rank.
        """
        start = time.perf_counter()
        with self._maybe_trace():
            loss = super().train_batch(data_iter)
        if self.global_rank == 0 and self.monitor.enabled:
            self.monitor.write_events([("Train/Samples/step_time_ms", (time.perf_counter() - start) * 1e3,
                                        self.global_samples)])
        return loss

