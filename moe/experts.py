"""Routed experts on physical slots: grouped SwiGLU GEMMs, home parameters and slot buffers.

Legend: M rows routed to this rank (grouped by local slot), H hidden size, I expert FFN width,
Lc local slots (S/P), Eh home experts per rank (E/P), G groups of a grouped GEMM.

    h_M2I = grouped(x_MH, slot_gate_up[Lc, 2I, H]);  a_MI = silu(h[:, :I]) * h[:, I:]
    y_MH  = grouped(a_MI, slot_down[Lc, H, I])

Weights: the trainable `gate_up_proj [Eh, 2I, H]` and `down_proj [Eh, H, I]` (transformers'
DeepseekV3Experts layout) hold this rank's *home* experts and never enter the autograd graph. The
forward runs on slot *buffers* (copies of homes, one per physical slot), so DeepSpeed's optimizer
sees only homes and a rebalance only rewrites buffers. The GEMM backward returns dx at once and
hands dW to `dualmoe.wgrad.defer_or_run` (the zero-bubble W split); dW lands in slot gradient
buffers, and `reduce_slot_grads` sums them into the homes' `.grad` (one all-to-all, the adjoint of
`refresh_slots`). Homes carry DeepSpeed's expert marks (`allreduce=False`, `group_name`), so
DeepSpeed then reduces them over the expert-data-parallel group and ZeRO puts them in MoE groups.

Grouped GEMM: `F.grouped_mm` (or `torch._grouped_mm` on older torch) for bf16 on CUDA; elsewhere (CPU,
fp32/fp64) a loop of `torch.mm` over the groups with the same math.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dualmoe.log import warn_once
from dualmoe.wgrad import WeightGradQueue, accumulate_grad, defer_or_run
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.profiler import record_function

from .dispatch import all_to_all_rows
from .placement import SlotExchange

__all__ = ["SlotExperts", "expert_group_name", "grouped_mm", "grouped_mm_dx", "grouped_wgrad_"]

logger = logging.getLogger(__name__)
_FAST_PATH_BROKEN: set[str] = set()
# torch >= 2.10 has the public F.grouped_mm (bf16, CUDA SM80+); older builds only the private op.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel / expert-data-parallel groups of this EP size."""
    return f"ep_size_{ep_size}"


def _fast(*tensors: Tensor, op: str) -> bool:
    """Use torch._grouped_mm: CUDA, bf16, 16-byte aligned rows, and not failed before."""
    t = tensors[0]
    return (t.is_cuda and _GROUPED_MM is not None and op not in _FAST_PATH_BROKEN
            and all(x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 for x in tensors))


def _offsets(counts: Sequence[int], device: torch.device) -> Tensor:
    return _cached_offsets(tuple(counts), device)


@functools.lru_cache(maxsize=128)
def _cached_offsets(counts: tuple[int, ...], device: torch.device) -> Tensor:
    # One host->device copy per (micro-batch, layer): forward, dx and dW of both GEMMs share it.
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def _try_fast(op: str, fn: Callable[[], Tensor]) -> Tensor | None:
    try:
        return fn()
    except RuntimeError as err:  # an unsupported shape/arch: fall back for good, once per op
        _FAST_PATH_BROKEN.add(op)
        warn_once(logger, f"torch._grouped_mm failed for {op} ({err}); using the per-expert loop")
        return None


def grouped_mm(x_MK: Tensor, w_GNK: Tensor, counts: Sequence[int]) -> Tensor:
    """y rows of group g = x rows of g @ w[g].T (`counts[g]` consecutive rows per group) -> [M, N]."""
    if _fast(x_MK, w_GNK, op="fwd") and x_MK.shape[0] > 0:
        y = _try_fast("fwd", lambda: _GROUPED_MM(x_MK, w_GNK.transpose(-2, -1), offs=_offsets(counts, x_MK.device)))
        if y is not None:
            return y
    out = x_MK.new_empty((x_MK.shape[0], w_GNK.shape[1]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(x_MK[start:start + n], w_GNK[g].t(), out=out[start:start + n])
        start += n
    return out


def grouped_mm_dx(dy_MN: Tensor, w_GNK: Tensor, counts: Sequence[int]) -> Tensor:
    """Input grad of `grouped_mm`: dx rows of g = dy rows of g @ w[g] -> [M, K]."""
    if _fast(dy_MN, w_GNK, op="dx") and dy_MN.shape[0] > 0:
        dx = _try_fast("dx", lambda: _GROUPED_MM(dy_MN, w_GNK, offs=_offsets(counts, dy_MN.device)))
        if dx is not None:
            return dx
    out = dy_MN.new_empty((dy_MN.shape[0], w_GNK.shape[2]))
    start = 0
    for g, n in enumerate(counts):
        if n:
            torch.mm(dy_MN[start:start + n], w_GNK[g], out=out[start:start + n])
        start += n
    return out


def grouped_wgrad_(out_GNK: Tensor, dy_MN: Tensor, x_MK: Tensor, counts: Sequence[int]) -> None:
    """Weight grad of `grouped_mm`, accumulated in place: out[g] += dy_g.T @ x_g."""
    if _fast(dy_MN, x_MK, op="dw") and dy_MN.shape[0] > 0:
        # 2-D x 2-D: the shared M dimension is split by offs, giving [G, N, K]; accumulate in fp32.
        dw = _try_fast("dw", lambda: _GROUPED_MM(dy_MN.t(), x_MK, offs=_offsets(counts, x_MK.device),
                                                 out_dtype=out_GNK.dtype))
        if dw is not None:
            out_GNK.add_(dw)
            return
    start = 0
    for g, n in enumerate(counts):
        if n:
            dy_g, x_g = dy_MN[start:start + n], x_MK[start:start + n]
            if out_GNK.dtype == dy_g.dtype:
                out_GNK[g].addmm_(dy_g.t(), x_g)
            else:
                out_GNK[g].add_(torch.mm(dy_g.t(), x_g))
        start += n


class _GroupedLinear(torch.autograd.Function):
    """grouped_mm on slot weights; backward: dx now, dW via the weight-grad queue into slot grads."""

    @staticmethod
    def forward(ctx: FunctionCtx, x_MK: Tensor, w_GNK: Tensor, anchor: Tensor, counts: tuple[int, ...],
                owner: SlotExperts, which: int) -> Tensor:
        ctx.save_for_backward(x_MK, w_GNK)
        ctx.counts, ctx.owner, ctx.which = counts, owner, which
        return grouped_mm(x_MK, w_GNK, counts)

    @staticmethod
    def backward(ctx: FunctionCtx, dy_MN: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        x_MK, w_GNK = ctx.saved_tensors
        dy_MN = dy_MN.contiguous()
        dx = grouped_mm_dx(dy_MN, w_GNK, ctx.counts) if ctx.needs_input_grad[0] else None
        ctx.owner._defer_wgrad(ctx.which, dy_MN, x_MK, ctx.counts)
        return dx, None, None, None, None, None


class SlotExperts(nn.Module):
    """This rank's home experts (trainable) and its slot copies (buffers) with grouped SwiGLU compute.

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
        self.register_buffer("slot_gate_up", torch.zeros(self.num_local_slots, 2 * i, h, **kw), persistent=False)
        self.register_buffer("slot_down", torch.zeros(self.num_local_slots, h, i, **kw), persistent=False)
        self._queue: WeightGradQueue | None = None
        self._slot_grads: list[Tensor | None] = [None, None]
        self._pending_wgrad = 0
        self._dirty = False  # slot grads hold data not yet reduced into the homes
        self._anchor: Tensor | None = None

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x_MH: Tensor, tokens_per_local_slot: Sequence[int]) -> Tensor:
        """SwiGLU of each row with its slot's expert; rows come grouped by local slot."""
        counts = tuple(int(n) for n in tokens_per_local_slot)
        anchor = self._grad_anchor(x_MH.device)
        x_MH = x_MH.to(self.slot_gate_up.dtype)
        with record_function("dualmoe/moe/experts"):
            h_M2I = _GroupedLinear.apply(x_MH, self.slot_gate_up, anchor, counts, self, 0)
            gate, up = h_M2I.chunk(2, dim=-1)
            return _GroupedLinear.apply(F.silu(gate) * up, self.slot_down, anchor, counts, self, 1)

    def _grad_anchor(self, device: torch.device) -> Tensor:
        # A leaf that requires grad makes autograd call the GEMM backward (and so produce dW) even when
        # the layer input does not require grad; it never receives a gradient itself.
        if self._anchor is None or self._anchor.device != device:
            self._anchor = torch.zeros((), device=device, requires_grad=True)
        return self._anchor

    def set_weight_grad_queue(self, queue: WeightGradQueue | None) -> None:
        """Defer dW through `queue` (the engine's zero-bubble W split); None computes dW inline."""
        self._queue = queue

    def _defer_wgrad(self, which: int, dy_MN: Tensor, x_MK: Tensor, counts: tuple[int, ...]) -> None:
        self._pending_wgrad += 1

        def weight_grad() -> None:
            with record_function("dualmoe/moe/experts_wgrad"):
                grouped_wgrad_(self._slot_grad(which), dy_MN, x_MK, counts)
            self._pending_wgrad -= 1
            self._dirty = True

        defer_or_run(self._queue, weight_grad, (dy_MN, x_MK))

    def _slot_grad(self, which: int) -> Tensor:
        grad = self._slot_grads[which]
        slot = self.slot_gate_up if which == 0 else self.slot_down
        if grad is None or grad.device != slot.device or grad.shape != slot.shape:
            # Accumulate in fp32 when the weights are 16-bit: slot grads sum micro-batches and replicas.
            dtype = torch.float32 if slot.element_size() < 4 else slot.dtype
            grad = torch.zeros(slot.shape, dtype=dtype, device=slot.device)
            self._slot_grads[which] = grad
        return grad

    # ---- homes <-> slots -------------------------------------------------------------------------
    def slots_match_homes(self) -> bool:
        """Slot buffers have the homes' dtype and device (not so after e.g. DeepSpeed casts parameters only)."""
        return all(s.dtype == h.dtype and s.device == h.device
                   for s, h in ((self.slot_gate_up, self.gate_up_proj), (self.slot_down, self.down_proj)))

    def match_homes(self) -> None:
        """Reallocate the slot buffers (zeros) with the homes' dtype and device; a full refresh must follow."""
        for name, home in (("slot_gate_up", self.gate_up_proj), ("slot_down", self.down_proj)):
            slot = getattr(self, name)
            setattr(self, name, torch.zeros(slot.shape, dtype=home.dtype, device=home.device))

    @torch.no_grad()
    def refresh_slots(self, exchange: SlotExchange, group: dist.ProcessGroup | None) -> None:
        """Copy home weights into the slots named by `exchange` (collective over `group`)."""
        with record_function("dualmoe/moe/refresh_slots"):
            for home, slot in ((self.gate_up_proj, self.slot_gate_up), (self.down_proj, self.slot_down)):
                index = torch.tensor(exchange.home_index, dtype=torch.long, device=home.device)
                rows = all_to_all_rows(home.detach().index_select(0, index), list(exchange.send_counts),
                                       list(exchange.recv_counts), group)
                slot_index = torch.tensor(exchange.slot_index, dtype=torch.long, device=slot.device)
                slot.index_copy_(0, slot_index, rows.to(slot.dtype))

    @torch.no_grad()
    def reduce_slot_grads(self, exchange: SlotExchange, group: dist.ProcessGroup | None) -> list[nn.Parameter]:
        """Sum every slot's gradient into its home's `.grad` (collective), then zero the slot grads.

        Returns:
            The home parameters whose `.grad` was written (always both, zeros when no token came).

        Raises:
            RuntimeError: deferred weight-grad work of this layer has not run yet.
        """
        if self._pending_wgrad:
            raise RuntimeError(f"{self._pending_wgrad} deferred expert weight grads are still queued; run the "
                               "weight-grad queue (W actions) before reducing slot gradients")
        with record_function("dualmoe/moe/reduce_slot_grads"):
            for which, home in enumerate((self.gate_up_proj, self.down_proj)):
                slot_grad = self._slot_grad(which)
                index = torch.tensor(exchange.slot_index, dtype=torch.long, device=slot_grad.device)
                rows = all_to_all_rows(slot_grad.index_select(0, index), list(exchange.recv_counts),
                                       list(exchange.send_counts), group)
                home_index = torch.tensor(exchange.home_index, dtype=torch.long, device=home.device)
                summed = torch.zeros(home.shape, dtype=rows.dtype, device=home.device).index_add_(0, home_index, rows)
                accumulate_grad(home, summed)
                slot_grad.zero_()
        self._dirty = False
        return [self.gate_up_proj, self.down_proj]

    def has_slot_grads(self) -> bool:
        """True when a backward has produced slot gradients not yet reduced into the homes."""
        return self._dirty or self._pending_wgrad > 0
