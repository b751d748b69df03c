"""Routed experts on physical slots: grouped SwiGLU GEMMs on the home parameters and on replica buffers.

Legend: M rows routed to this rank (grouped by compute position), H hidden size, I expert FFN width,
Eh home experts per rank (E/P), Rl distinct remote experts held here (replica rows), G GEMM groups.

    rows of home experts:    h = grouped(x, gate_up_proj[Eh, 2I, H]);  y = grouped(silu(h1) * h2, down_proj[Eh, H, I])
    rows of remote experts:  the same on replica_gate_up [Rl, 2I, H] and replica_down [Rl, H, I]

Weights. The trainable `gate_up_proj [Eh, 2I, H]` and `down_proj [Eh, H, I]` (transformers'
DeepseekV3Experts layout) hold this rank's *home* experts and carry DeepSpeed's expert marks
(`allreduce=False`, `group_name`), so DeepSpeed reduces them over the expert-data-parallel group and
ZeRO puts them in MoE param groups. A slot whose expert is homed on this rank computes with the home
parameter directly (its rows form the home part of the GEMM, see `dualmoe.moe.placement.SlotLayout`);
a slot holding another rank's expert computes with a row of the replica buffers, which
`refresh_replicas` fills from the homes after each optimizer step. With R = 0 and the identity
placement there are no replica rows: no buffer, no copy, no exchange; memory is that of a plain layer.

Gradients. The GEMM backward returns dx at once and hands dW to `dualmoe.wgrad.defer_or_run` (the
zero-bubble W split). dW of the home part is accumulated straight into the home's `.grad` in the
weight dtype, exactly as autograd's AccumulateGrad would for a dense parameter, so DeepSpeed's own
per-micro-batch hand-off (BF16_Optimizer's fp32 accumulator, ZeRO's fp32 `grad_accum`, the pipeline
engine's `_after_grads`) treats it like every other gradient. dW of the replica part accumulates in
fp32 replica-gradient buffers (16-bit weights; micro-batches add up there) and `reduce_slot_grads`
sends it home in the weight dtype (one all-to-all, the adjoint of the refresh) at the step boundary.
No autograd hook fires for these hand-written grads, so the MoE engine hands the homes to the optimizer
at the boundary (`dualmoe.moe.hooks.hand_grads_to_optimizer`), as before.

Grouped GEMMs: `dualmoe.moe.grouped` (grouped_mm on CUDA bf16, the per-expert loop as CPU reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dualmoe.wgrad import WeightGradQueue, accumulate_grad, defer_or_run
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.profiler import record_function

from .dispatch import all_to_all_rows
from .grouped import (
    fallback_counts,
    grouped_mm,
    grouped_mm_dx,
    grouped_mm_layout_problem,
    grouped_wgrad,
    grouped_wgrad_,
)
from .placement import Placement, ReplicaExchange, SlotLayout, slot_layout

__all__ = [
    "SlotExperts",
    "SlotView",
    "expert_group_name",
    "fallback_counts",
    "grouped_mm",
    "grouped_mm_dx",
    "grouped_mm_layout_problem",
    "grouped_wgrad_",
]

HOME, REPLICA = 0, 1  # the two parts of a rank's rows


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of this EP size."""
    return f"ep_size_{ep_size}"


def _check_group(exchange: ReplicaExchange, group: dist.ProcessGroup | None, what: str) -> None:
    if exchange.any_rows and group is None:
        raise RuntimeError(f"{what}: replicas live on other EP ranks but no expert-parallel group was given")


def _accumulate_home_wgrad(home: nn.Parameter, dy_MN: Tensor, x_MK: Tensor, counts: Sequence[int]) -> None:
    """dW of the home part into `home.grad` like AccumulateGrad: set when None (no copy), else add."""
    dw = grouped_wgrad(dy_MN, x_MK, counts)
    if dw is not None:
        accumulate_grad(home, dw)
        return
    with torch.no_grad():
        if home.grad is None:
            home.grad = torch.zeros_like(home)
        grouped_wgrad_(home.grad, dy_MN, x_MK, counts)


class _GroupedLinear(torch.autograd.Function):
    """grouped_mm on one part's weights; backward: dx now, dW via the weight-grad queue."""

    @staticmethod
    def forward(ctx: FunctionCtx, x_MK: Tensor, w_GNK: Tensor, anchor: Tensor, counts: tuple[int, ...],
                owner: SlotExperts, key: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x_MK, w_GNK)
        ctx.counts, ctx.owner, ctx.key = counts, owner, key
        return grouped_mm(x_MK, w_GNK, counts)

    @staticmethod
    def backward(ctx: FunctionCtx, dy_MN: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        x_MK, w_GNK = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = grouped_mm_dx(dy_MN, w_GNK, ctx.counts) if ctx.needs_input_grad[0] else None
        ctx.owner._defer_wgrad(ctx.key, dy_MN, x_MK, ctx.counts)
        return dx, None, None, None, None, None


class SlotView:
    """This rank's slot weights as one virtual `[S/P, N, K]` tensor: row j is what local slot j computes with.

    Rows are the home parameter's rows or replica-buffer rows, never copies. Indexing one row returns a
    view; `detach()`/`clone()` materialise the whole stack (for inspection and tests). `index_copy_`
    *stages* new contents for some local slots; the next `MoELayer.set_placement(refresh="none")` takes
    them (the EPLB rebalancer's commit writes the migrated rows this way, then switches the maps).
    """

    def __init__(self, experts: SlotExperts, which: int) -> None:
        self._experts, self._which = experts, which

    @property
    def _home(self) -> Tensor:
        return self._experts.homes()[self._which]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the homes')."""
        return self._home.dtype

    @property
    def device(self) -> torch.device:
        """The weights' device."""
        return self._home.device

    @property
    def shape(self) -> torch.Size:
        """[S/P, N, K]."""
        return torch.Size((self._experts.num_local_slots, *self._home.shape[1:]))

    def element_size(self) -> int:
        """Bytes per element."""
        return self._home.element_size()

    def __len__(self) -> int:
        return self._experts.num_local_slots

    def __getitem__(self, slot: int) -> Tensor:
        return self._experts.slot_weight(self._which, int(slot))

    def new_empty(self, size: Sequence[int]) -> Tensor:
        """An uninitialised tensor of the weights' dtype and device."""
        return self._home.new_empty(tuple(size))

    def detach(self) -> Tensor:
        """All S/P slot rows stacked (a copy)."""
        return torch.stack([self[j].detach() for j in range(len(self))])

    def clone(self) -> Tensor:
        """Same as `detach()`: a fresh tensor."""
        return self.detach()

    def index_copy_(self, dim: int, index: Tensor, source: Tensor) -> SlotView:
        """Stage `source[i]` as the new contents of local slot `index[i]` (for the next placement switch)."""
        if dim != 0:
            raise ValueError(f"SlotView.index_copy_ stages whole slots (dim 0); got dim={dim}")
        self._experts.stage_slot_rows(self._which, [int(j) for j in index.tolist()], source)
        return self


class SlotExperts(nn.Module):
    """This rank's home experts (trainable), replica buffers for remote experts, grouped SwiGLU compute.

    Args:
        num_experts: E logical experts of the layer.
        num_slots: S physical slots of the layer.
        ep_size: P; E and S must be divisible by it.
        hidden_size: H.
        ffn_hidden_size: I.
        dtype, device: of the weights.
    """

    def __init__(self, *, num_experts: int, num_slots: int, ep_size: int, hidden_size: int, ffn_hidden_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.num_slots, self.ep_size = num_experts, num_slots, ep_size
        self.num_home, self.num_local_slots = num_experts // ep_size, num_slots // ep_size
        h, i = hidden_size, ffn_hidden_size
        kw = {"dtype": dtype, "device": device}
        self.gate_up_proj = nn.Parameter(torch.zeros(self.num_home, 2 * i, h, **kw))
        self.down_proj = nn.Parameter(torch.zeros(self.num_home, h, i, **kw))
        for p in (self.gate_up_proj, self.down_proj):
            # DeepSpeed's expert marks (deepspeed.moe.utils.is_moe_param): reduce over expert-DP only.
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)
        self.layout: SlotLayout = slot_layout(Placement.identity(num_experts, num_slots, num_ranks=ep_size), 0)
        self.register_buffer("replica_gate_up", torch.zeros(self.layout.num_replicas, 2 * i, h, **kw),
                             persistent=False)
        self.register_buffer("replica_down", torch.zeros(self.layout.num_replicas, h, i, **kw), persistent=False)
        self._queue: WeightGradQueue | None = None
        self._replica_grads: list[Tensor | None] = [None, None]
        self._staged: dict[int, dict[int, Tensor]] = {0: {}, 1: {}}
        self._pending_wgrad = 0
        self._dirty = False  # replica grads hold data not yet sent home
        self._home_touched = [False, False]  # the homes' .grad got a contribution since the last reduce
        self._anchor: Tensor | None = None
        # Asynchronous refresh: (work, what to do after it, tensors it reads) until someone needs the replicas.
        self._inflight: list[tuple[dist.Work, Callable[[], None] | None, tuple[Tensor, ...]]] = []
        # Replica gradients already on their way home (`start_reduce`): which -> (work, received rows, sent).
        self._reduce_inflight: dict[int, tuple[dist.Work, Tensor, Tensor]] = {}

    # ---- views --------------------------------------------------------------------------------------
    def homes(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(gate_up_proj, down_proj)."""
        return self.gate_up_proj, self.down_proj

    def replicas(self) -> tuple[Tensor, Tensor]:
        """(replica_gate_up, replica_down): rows of `layout.replica_experts` (an asynchronous refresh in flight
        is waited for first)."""
        if self._inflight:
            self.wait_refresh()
        return self.replica_gate_up, self.replica_down

    def wait_refresh(self) -> None:
        """Finish an asynchronous `refresh_replicas`: on CUDA the current stream waits (the host does not)."""
        inflight, self._inflight = self._inflight, []
        for work, finish, _keep_alive in inflight:
            work.wait()
            if finish is not None:
                finish()

    @property
    def refresh_in_flight(self) -> bool:
        """An asynchronous refresh was issued and nothing has waited for it yet."""
        return bool(self._inflight)

    @property
    def slot_gate_up(self) -> SlotView:
        """The gate/up weights of the S/P local slots (a `SlotView`: aliases, not a buffer)."""
        return SlotView(self, 0)

    @property
    def slot_down(self) -> SlotView:
        """The down weights of the S/P local slots (a `SlotView`)."""
        return SlotView(self, 1)

    def slot_weight(self, which: int, slot: int) -> Tensor:
        """The [N, K] weight local `slot` computes with (0: gate/up, 1: down): a home row or a replica row."""
        expert = self.layout.local_experts[slot]
        local = expert - self.layout.ep_rank * self.num_home
        if 0 <= local < self.num_home:
            return self.homes()[which][local]
        return self.replicas()[which][self.layout.replica_experts.index(expert)]

    # ---- compute ------------------------------------------------------------------------------------
    def forward(self, x_MH: Tensor, rows_per_position: Sequence[int]) -> Tensor:
        """SwiGLU of each row with its slot's expert; rows come grouped by compute position (`SlotLayout`)."""
        home_counts, replica_counts = self.layout.group_counts(rows_per_position)
        num_home_rows = sum(home_counts)
        anchor = self._grad_anchor(x_MH.device)
        x_MH = x_MH.to(self.gate_up_proj.dtype)
        with record_function("dualmoe/moe/experts"):
            if num_home_rows == x_MH.shape[0]:  # R = 0 identity: all rows use the homes, no split or cat
                return self._swiglu(x_MH, HOME, tuple(home_counts), anchor)
            if num_home_rows == 0:
                return self._swiglu(x_MH, REPLICA, tuple(replica_counts), anchor)
            x_home, x_replica = x_MH.split([num_home_rows, x_MH.shape[0] - num_home_rows])
            return torch.cat([self._swiglu(x_home, HOME, tuple(home_counts), anchor),
                              self._swiglu(x_replica, REPLICA, tuple(replica_counts), anchor)])

    def _swiglu(self, x_MH: Tensor, part: int, counts: tuple[int, ...], anchor: Tensor) -> Tensor:
        gate_up, down = self.homes() if part == HOME else self.replicas()
        # Detached: the homes never enter the autograd graph (their dW arrives through the W queue).
        h_M2I = _GroupedLinear.apply(x_MH, gate_up.detach(), anchor, counts, self, (part, 0))
        gate, up = h_M2I.chunk(2, dim=-1)
        return _GroupedLinear.apply(F.silu(gate) * up, down.detach(), anchor, counts, self, (part, 1))

    def _grad_anchor(self, device: torch.device) -> Tensor:
        # A leaf that requires grad makes autograd call the GEMM backward (and so produce dW) even when
        # the layer input does not require grad; it never receives a gradient itself.
        if self._anchor is None or self._anchor.device != device:
            self._anchor = torch.zeros((), device=device, requires_grad=True)
        return self._anchor

    def set_weight_grad_queue(self, queue: WeightGradQueue | None) -> None:
        """Defer dW through `queue` (the engine's zero-bubble W split); None computes dW inline."""
        self._queue = queue

    def _defer_wgrad(self, key: tuple[int, int], dy_MN: Tensor, x_MK: Tensor, counts: tuple[int, ...]) -> None:
        part, which = key
        if part == REPLICA and self._reduce_inflight:
            raise RuntimeError("a backward after the step's replica gradients were sent home "
                               "(arm_slot_grad_reduce arms only the last micro-batch of a step)")
        self._pending_wgrad += 1

        def weight_grad() -> None:
            with record_function("dualmoe/moe/experts_wgrad"):
                if part == HOME:
                    _accumulate_home_wgrad(self.homes()[which], dy_MN, x_MK, counts)
                    self._home_touched[which] = True
                else:
                    grouped_wgrad_(self._replica_grad(which), dy_MN, x_MK, counts)
                    self._dirty = True
            self._pending_wgrad -= 1

        defer_or_run(self._queue, weight_grad, (dy_MN, x_MK))

    def _replica_grad(self, which: int) -> Tensor:
        grad = self._replica_grads[which]
        rows = self.replicas()[which]
        # Accumulate in fp32 when the weights are 16-bit: replica grads sum micro-batches before going home.
        dtype = torch.float32 if rows.element_size() < 4 else rows.dtype
        if grad is None or grad.device != rows.device or grad.shape != rows.shape or grad.dtype != dtype:
            grad = torch.zeros(rows.shape, dtype=dtype, device=rows.device)
            self._replica_grads[which] = grad
        return grad

    # ---- layout and replica buffers ---------------------------------------------------------------
    def stage_slot_rows(self, which: int, local_slots: Sequence[int], rows: Tensor) -> None:
        """Stage new contents of local slots (0: gate/up, 1: down) for the next `set_layout`."""
        for j, slot in enumerate(local_slots):
            self._staged[which][slot] = rows[j]

    def missing_replicas(self, layout: SlotLayout) -> tuple[int, ...]:
        """Remote experts `layout` needs that neither the current replicas nor staged rows provide."""
        staged = {layout.local_experts[s] for s in self._staged[0]} & {layout.local_experts[s] for s in self._staged[1]}
        held = set(self.layout.replica_experts) if self.layout.ep_rank == layout.ep_rank else set()
        return tuple(x for x in layout.replica_experts if x not in held and x not in staged)

    @torch.no_grad()
    def set_layout(self, layout: SlotLayout) -> None:
        """Compute with `layout` from now on; replica rows come from staged rows or the current replicas.

        Rows of neither kind (see `missing_replicas`) are zeros until a refresh fills them. Call between
        steps (no replica gradients pending).
        """
        same_rank = layout.ep_rank == self.layout.ep_rank
        old_row = {x: r for r, x in enumerate(self.layout.replica_experts)} if same_rank else {}
        new_buffers = []
        for which, old in enumerate(self.replicas()):
            new = old.new_zeros((layout.num_replicas, *old.shape[1:]))
            staged = {layout.local_experts[s]: row for s, row in self._staged[which].items()}
            for r, expert in enumerate(layout.replica_experts):
                if expert in staged:
                    new[r].copy_(staged[expert])
                elif expert in old_row:
                    new[r].copy_(old[old_row[expert]])
            new_buffers.append(new)
        self.replica_gate_up, self.replica_down = new_buffers
        self._replica_grads = [None, None]
        self._staged = {0: {}, 1: {}}
        self.layout = layout

    def replicas_match_homes(self) -> bool:
        """Replica buffers have the homes' dtype and device (not so after e.g. DeepSpeed casts parameters only)."""
        # The raw buffers: dtype and device do not depend on a refresh in flight, so nothing waits here.
        return all(r.dtype == h.dtype and r.device == h.device
                   for r, h in zip((self.replica_gate_up, self.replica_down), self.homes()))

    def match_homes(self) -> None:
        """Reallocate the replica buffers (zeros) with the homes' dtype and device; a refresh must follow."""
        self.replica_gate_up, self.replica_down = (torch.zeros(r.shape, dtype=h.dtype, device=h.device)
                                                   for r, h in zip(self.replicas(), self.homes()))

    @torch.no_grad()
    def refresh_replicas(self, exchange: ReplicaExchange, group: dist.ProcessGroup | None, *,
                         async_op: bool = False) -> None:
        """Copy home weights into the replica rows named by `exchange` (collective over `group`).

        With `async_op` the exchange is only issued: the rows to send are copied out of the homes at once
        (the homes may change right after), and the replica buffers are complete once something waits
        (`wait_refresh`, which every access to the replicas does first). Use a `group` of its own, or the
        forward's all-to-alls queue behind the refresh on the same communicator.
        """
        _check_group(exchange, group, "refresh_replicas")
        async_op = async_op and group is not None
        with record_function("dualmoe/moe/refresh_replicas"):
            for home, buffer in zip(self.homes(), self.replicas()):
                index = torch.tensor(exchange.send_index, dtype=torch.long, device=home.device)
                send = home.detach().index_select(0, index)
                recv_counts, send_counts = list(exchange.recv_counts), list(exchange.send_counts)
                if group is not None and exchange.fills_all and buffer.is_contiguous():
                    # The received rows are the whole buffer in order: receive in place, no extra copy.
                    work = dist.all_to_all_single(buffer, send, recv_counts, send_counts, group=group,
                                                  async_op=async_op)
                    if async_op:
                        self._inflight.append((work, None, (send,)))
                    continue
                slot_index = torch.tensor(exchange.recv_index, dtype=torch.long, device=buffer.device)
                if not async_op:
                    rows = all_to_all_rows(send, send_counts, recv_counts, group)
                    buffer.index_copy_(0, slot_index, rows.to(buffer.dtype))
                    continue
                rows = send.new_empty((sum(recv_counts), *send.shape[1:]))
                work = dist.all_to_all_single(rows, send, recv_counts, send_counts, group=group, async_op=True)

                def finish(buffer: Tensor = buffer, slot_index: Tensor = slot_index, rows: Tensor = rows) -> None:
                    buffer.index_copy_(0, slot_index, rows.to(buffer.dtype))

                self._inflight.append((work, finish, (send, rows)))

    @torch.no_grad()
    def reduce_slot_grads(self, group: dist.ProcessGroup | None) -> list[nn.Parameter]:
        """Send replica gradients home and add them into the homes' `.grad` (collective when `group`).

        Home rows already accumulated their dW during backward; a home that got no gradient at all this
        step gets a zero `.grad`, so every rank of the expert-data-parallel group reduces the same tensors.

        Returns:
            The home parameters (both; their `.grad` may already have been handed to the optimizer).

        Raises:
            RuntimeError: deferred weight-grad work of this layer has not run yet.
        """
        if self._pending_wgrad:
            raise RuntimeError(f"{self._pending_wgrad} deferred expert weight grads are still queued; run the "
                               "weight-grad queue (W actions) before reducing slot gradients")
        exchange = self.layout.exchange
        _check_group(exchange, group, "reduce_slot_grads")
        with record_function("dualmoe/moe/reduce_slot_grads"):
            for which, home in enumerate(self.homes()):
                if which in self._reduce_inflight:
                    work, rows, _sent = self._reduce_inflight.pop(which)
                    work.wait()
                    self._add_home_rows(which, home, rows, exchange)
                elif exchange.any_rows:
                    self._send_replica_grads_home(which, home, exchange, group)
                if not self._home_touched[which] and home.grad is None:
                    home.grad = torch.zeros_like(home)
                if self._replica_grads[which] is not None:
                    self._replica_grads[which].zero_()
        self._dirty = False
        self._home_touched = [False, False]
        return list(self.homes())

    def start_reduce(self, group: dist.ProcessGroup) -> bool:
        """Send this step's replica gradients home now, asynchronously on `group` (the backward goes on).

        For the last micro-batch of a step, once its backward has passed this layer; `reduce_slot_grads`
        then only waits and adds. Every EP rank must call it at the same point (it is a collective), and
        `group` must be the one later calls use too. Returns False, doing nothing, while deferred
        weight-grad work is queued (the boundary then sends as usual).
        """
        exchange = self.layout.exchange
        if self._pending_wgrad or self._reduce_inflight or not exchange.any_rows:
            return False
        _check_group(exchange, group, "start_reduce")
        with record_function("dualmoe/moe/start_reduce"):
            for which, home in enumerate(self.homes()):
                send = self._replica_send(which, home, exchange)
                rows = send.new_empty((sum(exchange.send_counts), *send.shape[1:]))
                work = dist.all_to_all_single(rows, send, list(exchange.send_counts), list(exchange.recv_counts),
                                              group=group, async_op=True)
                self._reduce_inflight[which] = (work, rows, send)
        return True

    def _replica_send(self, which: int, home: nn.Parameter, exchange: ReplicaExchange) -> Tensor:
        grad = self._replica_grad(which)
        if not exchange.fills_all:
            grad = grad.index_select(0, torch.tensor(exchange.recv_index, dtype=torch.long, device=grad.device))
        # Sent in the weight dtype: one rounding of the fp32 sum, as the GEMM gives a home row's dW; half the
        # bytes of fp32. The home sums the contributions of all ranks in fp32 (or wider), then adds once.
        return grad.to(home.dtype)  # not touched again before the reduce waits (it zeroes the buffers)

    def _send_replica_grads_home(self, which: int, home: nn.Parameter, exchange: ReplicaExchange,
                                 group: dist.ProcessGroup | None) -> None:
        send = self._replica_send(which, home, exchange)
        self._add_home_rows(which, home, all_to_all_rows(send, list(exchange.recv_counts),
                                                         list(exchange.send_counts), group), exchange)

    def _add_home_rows(self, which: int, home: nn.Parameter, rows: Tensor, exchange: ReplicaExchange) -> None:
        if rows.shape[0] == 0:
            return
        unique = sorted(set(exchange.send_index))
        row_of = {h: i for i, h in enumerate(unique)}
        inverse = torch.tensor([row_of[h] for h in exchange.send_index], dtype=torch.long, device=rows.device)
        acc = torch.promote_types(rows.dtype, torch.float32)
        summed = torch.zeros((len(unique), *rows.shape[1:]), dtype=acc, device=rows.device)
        summed.index_add_(0, inverse, rows.to(acc))
        if home.grad is None:
            home.grad = torch.zeros_like(home)
        home.grad.index_add_(0, torch.tensor(unique, dtype=torch.long, device=home.device),
                             summed.to(home.grad.dtype))
        self._home_touched[which] = True

    def has_slot_grads(self) -> bool:
        """True from a backward (or queued W work) until `reduce_slot_grads` closes the step's accumulation."""
        return self._dirty or self._pending_wgrad > 0 or any(self._home_touched)
