"""The engine's step-level work: step end, failure, grad bookkeeping, loss aggregation, eval, tracing.

Mixed into `DualPipeEngine` (which owns the state these methods read: `_plan`, `_program`, `_state`,
`_comm`, `_queue`, `_abort`, `_feed`, `_context`); kept apart so the executor module stays small.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CommTimeout, ScheduleError
from .failure import PeerAborted, StageError, format_schedule
from .microbatch import StepState
from .program import RankProgram
from .schedule.ir import Action

__all__ = ["StepMixin"]

logger = logging.getLogger(__name__)


def _all_reduce_flat(tensors: Sequence[Tensor], group: Any) -> None:
    """Sum `tensors` over `group` with one all-reduce per dtype (flatten, reduce, copy back)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class StepMixin:
    """Step end, failure handling and loss reduction of the schedule engine."""

    def _finish_step(self, program: RankProgram) -> None:
        """Complete sends, check nothing is left over, agree with all ranks, then sync grads and step."""
        self._comm.finish(context=self._context)
        self._feed.drain()
        leftovers = self._state.leftovers()
        if leftovers or len(self._queue):
            raise ScheduleError(f"{self._context}: buffers {leftovers} and W of {self._queue.pending_keys()} "
                                f"are left at the end of the step; the schedule is incomplete")
        self._abort.agree(self._context)
        if program.train:
            with torch.profiler.record_function("dualmoe/reduce_shared_grads"):
                self._reduce_shared_grads()
                self._mark_replicated_grads()
            with torch.profiler.record_function("dualmoe/reduce_grads"):
                self._exec_reduce_grads()
            with torch.profiler.record_function("dualmoe/optimizer_step"):
                self._exec_optimizer_step()

    def _fail(self, actions: Sequence[Action], step: int | None, action: Action | None, err: Exception) -> None:
        """Log the schedule with the failing step marked, tell the other ranks, raise."""
        self._comm.reset()
        self._queue.clear()
        self._state = StepState()
        self._running_engine_backward = False
        message = f"{self._abort.where}, {self._context}: {type(err).__name__}: {err}"
        if not isinstance(err, PeerAborted):
            self._abort.post(message)
        logger.error("%s\nschedule of this rank (>> marks the failing step):\n%s", message,
                     format_schedule(actions, failed_step=step))
        if isinstance(err, CommTimeout):
            raise err
        raise StageError(message) from err

    def _after_grads(self) -> None:
        """BF16_Optimizer: move fresh low-precision grads into its fp32 accumulators (after each B, I, W).

        Same effect as DeepSpeed's `_update_hp_grad` (fp32 += grad, marked as having a grad, lp grad dropped),
        but one mixed-dtype add instead of an fp32 copy of the grad followed by an add: the same fp32 sums
        (bf16 -> fp32 is exact) with a third less memory traffic, paid for every parameter and micro-batch;
        all parameters' adds go in one `_foreach_add_` call.
        """
        slots = self._bf16_slots
        if not slots:
            return
        opt = self.optimizer
        hps: list[Tensor] = []
        grads: list[Tensor] = []
        for lp, i, j in slots:
            grad = lp.grad
            if grad is None:
                continue
            if self._bf16_folding:  # AutoEP's folded grads need DeepSpeed's correction first
                opt._update_hp_grad(lp, i, j, clear_lp_grads=False)
            else:
                hp = opt.fp32_groups_gradients[i][j]
                hps.append(hp)
                grads.append(grad.view(hp.shape))
                lp._hp_grad = hp
                opt.fp32_groups_has_gradients[i][j] = True
            lp.grad = None
        if hps:  # one multi-tensor launch instead of one add per parameter (same sums, host time)
            torch._foreach_add_(hps, grads)

    @property
    def _bf16_slots(self) -> list[tuple[Tensor, int, int]]:
        """(low-precision param, group, index) of every BF16_Optimizer param (empty for other optimizers)."""
        slots = getattr(self, "_bf16_slot_cache", None)
        if slots is None:
            opt = self.optimizer
            slots = [(lp, i, j) for i, group in enumerate(opt.bf16_groups) for j, lp in enumerate(group)] \
                if self.using_bf16_optimizer else []
            self._bf16_folding = getattr(opt, "autoep_folding_tp_group", None) is not None
            self._bf16_slot_cache = slots
        return slots

    def _reduce_shared_grads(self) -> None:
        """Sum the grads of parameters held on several pipeline ranks (DualPipe copies, tied layers).

        The grad summed is the one DeepSpeed reduces and steps on: BF16_Optimizer's fp32 accumulator, else
        `param.grad` (created as zeros where this copy got no grad, so every rank sends the same layout).
        """
        opt = self.optimizer
        hp_index = ({id(lp): (i, j) for i, group in enumerate(opt.bf16_groups) for j, lp in enumerate(group)}
                    if self.using_bf16_optimizer else {})
        for group, params in self.module.shared_grads:
            grads = []
            for p in params:
                if not p.requires_grad:
                    continue
                if id(p) in hp_index:
                    i, j = hp_index[id(p)]
                    opt.fp32_groups_has_gradients[i][j] = True
                    grads.append(opt.fp32_groups_gradients[i][j])
                else:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    grads.append(p.grad)
            _all_reduce_flat(grads, group)

    def _mark_replicated_grads(self) -> None:
        """Flag the grads of replicated copies too: DeepSpeed 0.19.8's FP16_UnfusedOptimizer hands `get_weight_norm`
        the grads, not the parameters, so its `ds_pipe_replicated` test would count every copy in the clip norm."""
        for p in self._replicated_params:
            if p.grad is not None:
                p.grad.ds_pipe_replicated = True

    @property
    def _replicated_params(self) -> list[Tensor]:
        params = getattr(self, "_replicated_cache", None)
        if params is None:
            params = self._replicated_cache = [p for p in self.module.parameters()
                                               if getattr(p, "ds_pipe_replicated", False)]
        return params

    def clip_fp32_gradients(self) -> None:
        """Clip to `gradient_clipping` by the global norm over the pipeline, each shared copy counted once."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        squares = [p.grad.detach().float().pow(2).sum() for p in params if not getattr(p, "ds_pipe_replicated", False)]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.device)
        dist.all_reduce(total, group=self._plan.groups.pp)
        coef = (self.gradient_clipping() / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))

    def _mean_loss(self, num_microbatches: int) -> Tensor:
        """Mean over all micro-batches of the loss, on every pipeline rank (losses live on the loss ranks)."""
        values = [self._state.loss_values[mb] for mb in sorted(self._state.loss_values)]
        for v in values:
            if v.dim() != 0:
                raise TypeError(f"loss_fn returned shape {tuple(v.shape)}; the schedule engine needs scalars")
        total = torch.stack(values).sum().float() if values else torch.zeros((), device=self.device)
        mean = (total / num_microbatches).reshape(1)
        dist.all_reduce(mean, group=self._plan.groups.pp)
        return mean[0]

    def _aggregate_total_loss(self) -> Tensor:
        """The step's mean loss, averaged over data parallel (DeepSpeed's `train_batch` return value)."""
        self.dp_group_loss = self._mean_loss(self._program.num_microbatches)
        loss = self.dp_group_loss.clone()
        if self._plan.groups.dp_size > 1:
            dist.all_reduce(loss, group=self._plan.groups.dp)
            loss /= self._plan.groups.dp_size
        self.agg_additional_losses = None
        return loss

    def eval_batch(self, data_iter: Iterator[Any], return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward-only pass over one batch; same arguments and results as DeepSpeed's `eval_batch`.

        Args:
            data_iter: yields `(inputs, labels)` per micro-batch, read as in training.
            return_logits: also return the loss stage's outputs per micro-batch (on the loss ranks).
            compute_loss: apply `loss_fn` (False: the loss stage's outputs are the result).
            reduce_output: "avg" (mean over micro-batches and DP, on every rank) or None (per micro-batch).
            bcast_loss: kept for DeepSpeed compatibility; "avg" results reach every rank anyway.
            num_micro_batches: micro-batches to evaluate (default gradient_accumulation_steps).

        Returns:
            The reduced result, or (result, {micro-batch: outputs}) with `return_logits`.
        """
        self.module.eval()
        num = self.micro_batches if num_micro_batches is None else num_micro_batches
        program = self._inference_schedule(num)
        saved_iter, self._return_logits, self._compute_loss = self.data_iterator, return_logits, compute_loss
        self.set_dataiterator(data_iter)
        try:
            with torch.no_grad():
                self._exec_schedule(program)
                if reduce_output is None:
                    result: Any = [self._state.loss_values[mb] for mb in sorted(self._state.loss_values)]
                else:
                    result = self._mean_loss(num)
                    if self._plan.groups.dp_size > 1:
                        dist.all_reduce(result, group=self._plan.groups.dp)
                        result /= self._plan.groups.dp_size
        finally:
            self.set_dataiterator(saved_iter)
            self._return_logits, self._compute_loss = False, True
        if self.global_rank == 0 and self.monitor.enabled and reduce_output is not None:
            self.monitor.write_events([("Train/Samples/eval_loss", float(result), self.global_samples)])
        logits = dict(self._state.logits)
        self._state.logits.clear()
        return (result, logits) if return_logits else result

    @contextlib.contextmanager
    def _maybe_trace(self) -> Iterator[None]:
        """Profile this step into `<output_dir>/trace_step<N>_rank<R>.json` when the config asks for it."""
        trace = self._plan.config.trace
        if not (trace.enabled and self.global_steps in trace.steps):
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            yield
        os.makedirs(trace.output_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace.output_dir,
                                              f"trace_step{self.global_steps - 1}_rank{self.global_rank}.json"))
