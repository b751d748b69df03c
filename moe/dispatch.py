"""Dropless token dispatch/combine over physical expert slots with variable-split all-to-all.

Legend: T tokens, K = top_k, N = T*K routed copies, D hidden size, S slots (S/P per rank),
P EP ranks, R rows received by this rank (from all sources), E logical experts, X max replicas.

The six stages (Megatron's `MoETokenDispatcher` shape, so a scheduler can place each all-to-all by
itself, e.g. overlap one micro-batch's dispatch with another's experts):

    dispatch_preprocess   sort the N (token, k) copies by slot; exchange per-slot counts  -> x_ND
    token_dispatch        all_to_all_single, variable splits (one block per EP rank)     -> x_RD
    dispatch_postprocess  regroup received rows by local slot for the grouped GEMM       -> x_RD'
    (experts)
    combine_preprocess    undo the regrouping                                            -> y_RD
    token_combine         reverse all_to_all_single                                      -> y_ND
    combine_postprocess   undo the sort, weight by the gates, sum the K copies           -> y_TD

With one EP rank (no group) the all-to-alls are identities and nothing is communicated. Slot choice:
`choose_replica_slots` maps logical ids to slots: the i-th copy (in token order) of expert e on
this rank goes to replica (i + ep_rank) mod replica_count[e], so each expert's tokens split evenly
over its replicas (differences of at most one per rank) and deterministically.

Slot ids here may be any numbering of the S slots that keeps each rank's block (id // (S/P) is the
rank): `MoELayer` passes *compute positions* (`dualmoe.moe.placement.SlotLayout`), a per-rank
permutation of slots that puts each rank's home experts first, so rows arrive in the order of its
grouped GEMM and `tokens_per_local_slot` are its group sizes.

Cost (everything on [N, D] is memory-bound, so bytes moved are the measure). Every row movement is
a gather by a permutation (`order_N`, its inverse `position_TK`, `regroup_R`, `ungroup_R`), forward
and backward: no `index_add`, no atomics, results are deterministic. Sums over the K copies of a
token run in a fixed order (k = 0..K-1) in fp32 or wider, and nothing of size [N, D] is ever held in
fp32. Bookkeeping (sort, counts, regroup permutation) is sync-free on CUDA except for the one
`.tolist()` that the all-to-all splits need (`torch.bincount` and `repeat_interleave` without
`output_size` each synchronise, so neither is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.profiler import record_function

__all__ = ["DispatchState", "TokenDispatcher", "all_to_all_rows", "choose_replica_slots"]


def choose_replica_slots(topk_ids_TK: Tensor, logical_to_physical_EX: Tensor, replica_count_E: Tensor, *,
                         rotation: int = 0) -> Tensor:
    """Physical slot for every routed copy: an even, deterministic split over each expert's replicas.

    Args:
        topk_ids_TK: [T, K] logical expert ids.
        logical_to_physical_EX: [E, X] slots of each expert, -1 padded.
        replica_count_E: [E] replicas per expert.
        rotation: offset of the round robin (the EP rank), so ranks start on different replicas.

    Returns:
        [T, K] int64 slot ids.
    """
    if logical_to_physical_EX.shape[1] == 1:
        return logical_to_physical_EX[topk_ids_TK, 0]
    flat_N = topk_ids_TK.reshape(-1)
    sorted_ids_N, order_N = torch.sort(flat_N, stable=True)
    # First sorted position of each expert = number of smaller ids (no bincount: it syncs on CUDA).
    experts_E = torch.arange(replica_count_E.numel(), dtype=sorted_ids_N.dtype, device=flat_N.device)
    starts_E = torch.searchsorted(sorted_ids_N, experts_E)
    rank_in_expert_N = torch.arange(flat_N.numel(), device=flat_N.device) - starts_E[sorted_ids_N]
    replica_N = (rank_in_expert_N + rotation) % replica_count_E[sorted_ids_N]
    slots_N = torch.empty_like(flat_N)
    slots_N[order_N] = logical_to_physical_EX[sorted_ids_N, replica_N]
    return slots_N.view_as(topk_ids_TK)


def all_to_all_rows(x: Tensor, send_counts: list[int], recv_counts: list[int],
                    group: dist.ProcessGroup | None) -> Tensor:
    """Variable-split all-to-all along dim 0 (no autograd); identity when `group` is None."""
    if group is None:
        return x
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_rows whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, send_counts: list[int], recv_counts: list[int],
                group: dist.ProcessGroup | None) -> Tensor:
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return all_to_all_rows(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        send_counts, recv_counts = ctx.counts
        with record_function("dualmoe/moe/a2a_backward"):
            return all_to_all_rows(grad, recv_counts, send_counts, ctx.group), None, None, None


class _PermuteRows(torch.autograd.Function):
    """`x[index]` for a permutation `index`; the backward gathers by `inverse` (autograd's default for
    `index_select` is zeros plus an atomic `index_add`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherCopies(torch.autograd.Function):
    """`x_ND = x_TD[token_index_N]` (the K copies of every token, in slot order).

    Backward: grad_x[t] = sum_k grad_ND[position_TK[t, k]]. `embedding_bag(mode="sum")` with the
    [T, K] positions as fixed-size bags does the gather and the sum in one kernel, reading the
    [N, D] gradient once and writing [T, D], with no [N, D] temporary. On CUDA each output element
    is summed by one thread over k = 0..K-1 in `acc_type` (fp32 for bf16/fp16) and rounded once;
    the CPU kernel also accumulates fp16/bf16 in fp32 (fbgemm rounds ties away from zero there).
    autograd's own backward of `index_select` is an `index_add` of [N, D] into zeros: atomics on
    CUDA, bf16 rounding at every add, order not fixed.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x_TD: Tensor, token_index_N: Tensor, position_TK: Tensor) -> Tensor:
        ctx.save_for_backward(position_TK)
        return x_TD.index_select(0, token_index_N)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_ND: Tensor) -> tuple[Tensor, None, None]:
        (position_TK,) = ctx.saved_tensors
        with record_function("dualmoe/moe/dispatch_preprocess_backward"):
            return F.embedding_bag(position_TK, grad_ND.contiguous(), mode="sum"), None, None


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum_k gate[t, k] * y[position[t, k]], summed in fp32 or wider, returned in y's dtype.

    Forward: one gather by `position_TK` puts y in token-major order [T, K, D] (y's dtype); then an
    fp32 [T, D] accumulator takes the K copies in order k = 0..K-1 through `addcmul_`, which reads
    y's bf16 rows and the fp32 gates directly, so no fp32 copy of y exists; one cast at the end.
    (The unfused alternative, y.to(fp32) * gates then an atomic `index_add`, writes and re-reads
    two fp32 [N, D] tensors and keeps them for backward.)

    Backward, with g = grad_out [T, D]:
    - grad_y[i] = g[token(i)] * gate[i] for each copy i in slot order: one gather of g by
      `token_index_N`, then an in-place multiply by the fp32 gates (computed in fp32, rounded once
      to y's dtype -- the same rounding as casting an fp32 product).
    - grad_gate[t, k] = sum_d g[t, d] * y[t, k, d]: exact products summed in fp32 (`_row_dots`: one
      cuBLAS bmm with fp32 output on CUDA; a per-k loop elsewhere). A plain bf16 `bmm` would round
      these dot products to bf16.
    Saved: the token-major y (only when the gates need a gradient), the fp32 gates and two
    permutations; nothing fp32 of size [N, D]. (Mixed-dtype ops cast inside the kernel on CUDA; on
    the CPU, TensorIterator casts through transient copies, which is slower but the same math.)
    """

    @staticmethod
    def forward(ctx: FunctionCtx, y_ND: Tensor, gates_TK: Tensor, order_N: Tensor, position_TK: Tensor,
                token_index_N: Tensor) -> Tensor:
        num_tokens, top_k = gates_TK.shape
        acc = _accumulation_dtype(y_ND.dtype, gates_TK.dtype)
        y_TKD = y_ND.index_select(0, position_TK.reshape(-1)).view(num_tokens, top_k, y_ND.shape[-1])
        g_TK = gates_TK.to(acc)
        out_TD = torch.mul(y_TKD[:, 0], g_TK[:, :1])  # promotes to acc: the accumulator
        for k in range(1, top_k):
            out_TD.addcmul_(y_TKD[:, k], g_TK[:, k:k + 1])
        ctx.save_for_backward(y_TKD if ctx.needs_input_grad[1] else None, g_TK, order_N, token_index_N)
        ctx.gates_dtype = gates_TK.dtype
        return out_TD.to(y_ND.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_TD: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        y_TKD, g_TK, order_N, token_index_N = ctx.saved_tensors
        grad_y_ND = grad_gates_TK = None
        with record_function("dualmoe/moe/combine_postprocess_backward"):
            if ctx.needs_input_grad[0]:
                grad_y_ND = grad_TD.index_select(0, token_index_N)
                grad_y_ND.mul_(g_TK.reshape(-1).index_select(0, order_N).unsqueeze(-1))
            if ctx.needs_input_grad[1]:
                grad_gates_TK = _row_dots(grad_TD, y_TKD, g_TK.dtype).to(ctx.gates_dtype)
        return grad_y_ND, grad_gates_TK, None, None, None


def _row_dots(a_TD: Tensor, b_TKD: Tensor, acc: torch.dtype) -> Tensor:
    """[T, K] dots of a[t] with b[t, k] (a and b in one dtype): exact products, sums in `acc` (fp32 or wider).

    CUDA, bf16/fp16 operands, fp32 sums: one cuBLAS `bmm` with fp32 output (`out_dtype`, a CUDA-only
    op), which reads b once. Otherwise a loop over k with one [T, D] temporary in `acc` (the same math
    in another summation order; about 7x the bytes, fine off the GPU).
    """
    if a_TD.is_cuda and acc == torch.float32 and a_TD.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(b_TKD, a_TD.unsqueeze(-1), out_dtype=acc).squeeze(-1)
    num_tokens, top_k, _ = b_TKD.shape
    a_TD = a_TD.to(acc)
    out_KT = a_TD.new_empty((top_k, num_tokens))
    product_TD = torch.empty_like(a_TD)
    for k in range(top_k):
        torch.mul(a_TD, b_TKD[:, k], out=product_TD)
        torch.sum(product_TD, dim=-1, out=out_KT[k])
    return out_KT.t()


def _inverse(perm: Tensor, arange: Tensor | None = None) -> Tensor:
    if arange is None:
        arange = torch.arange(perm.numel(), device=perm.device)
    return torch.empty_like(perm).scatter_(0, perm, arange)


def _regroup_permutation(recv_PS: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """(regroup_R, ungroup_R): received rows, source-rank-major then slot, to local-slot-major.

    Row j of the slot-major order lies in block b = (s, p) at offset j - dst_start[b]; in the
    source-major order that row is src_start[p, s] + the same offset, so regroup[j] = j +
    (src_start - dst_start)[b]. Start and inclusive end of a block differ by its size in both
    orders, so the ends give the same difference. Equal to a stable argsort of the rows' local
    slots, without a sort (and without repeat_interleave's device->host sync).
    """
    p, per_rank = recv_PS.shape
    src_end_SP = recv_PS.reshape(-1).cumsum(0).view(p, per_rank).t()
    dst_end_SP = recv_PS.t().reshape(-1).cumsum(0).view(per_rank, p)
    rows_R = torch.arange(num_rows, device=recv_PS.device)
    block_R = torch.searchsorted(dst_end_SP.reshape(-1), rows_R, right=True)
    regroup_R = rows_R + (src_end_SP - dst_end_SP).reshape(-1)[block_R]
    return regroup_R, _inverse(regroup_R, rows_R)


@dataclass(slots=True, kw_only=True)
class DispatchState:
    """Everything the later stages of one dispatch need (one per micro-batch and layer)."""

    num_tokens: int
    """T."""
    token_index_N: Tensor
    """Source token of each sorted copy."""
    order_N: Tensor
    """Flat (token, k) index of each copy in slot order."""
    position_TK: Tensor
    """Slot-order position of copy (t, k): the inverse permutation of `order_N`, viewed [T, K]."""
    send_counts: list[int]
    """[P] copies sent to each EP rank."""
    recv_counts: list[int]
    """[P] rows received from each EP rank."""
    tokens_per_local_slot: list[int]
    """[S/P] rows each local slot processes (group sizes of the grouped GEMM)."""
    regroup_R: Tensor | None
    """Permutation taking received rows (source-major) to local-slot-major; None when P == 1."""
    ungroup_R: Tensor | None
    """Inverse of `regroup_R`."""


class TokenDispatcher:
    """Staged dispatch/combine of routed token copies to the ranks holding their slots.

    Args:
        num_slots: S physical slots of the layer.
        ep_group: the expert-parallel process group, or None for a single-rank layer.
    """

    def __init__(self, *, num_slots: int, ep_group: dist.ProcessGroup | None = None) -> None:
        self.num_slots = num_slots
        self.set_group(ep_group)

    def set_group(self, ep_group: dist.ProcessGroup | None) -> None:
        """Use `ep_group` from now on (a one-rank group counts as None)."""
        size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_group = ep_group if size > 1 else None
        self.ep_size = size
        if self.num_slots % size:
            raise ValueError(f"num_slots={self.num_slots} is not divisible by the EP group size {size}")

    def dispatch_preprocess(self, x_TD: Tensor, slot_ids_TK: Tensor) -> tuple[Tensor, DispatchState]:
        """Sort the routed copies by slot and agree with the peers on the split sizes.

        Args:
            x_TD: [T, D] tokens.
            slot_ids_TK: [T, K] slot of every routed copy, in [0, S).

        Returns:
            (x_ND, state): the copies in slot order, and the state for the other stages.

        Raises:
            ValueError: a slot id outside [0, S).
        """
        with record_function("dualmoe/moe/dispatch_preprocess"):
            num_tokens, top_k = slot_ids_TK.shape
            p, per_rank = self.ep_size, self.num_slots // self.ep_size
            flat_N = slot_ids_TK.reshape(-1)
            sorted_N, order_N = torch.sort(flat_N, stable=True)
            position_TK = _inverse(order_N).view(num_tokens, top_k)
            token_index_N = order_N // top_k
            # Per-slot counts as differences of the slots' first sorted positions (bincount syncs on CUDA).
            slots_S1 = torch.arange(self.num_slots + 1, dtype=sorted_N.dtype, device=flat_N.device)
            counts_S = torch.searchsorted(sorted_N, slots_S1).diff()
            if self.ep_group is None:
                recv_PS, both = counts_S.view(1, per_rank), counts_S
            else:
                recv_PS = all_to_all_rows(counts_S, [per_rank] * p, [per_rank] * p, self.ep_group).view(p, per_rank)
                both = torch.cat([counts_S, recv_PS.reshape(-1)])
            counts = both.tolist()  # the one device->host sync: every split size below comes from it
            sent, received = counts[:self.num_slots], counts[-self.num_slots:]
            send = [sum(sent[r * per_rank:(r + 1) * per_rank]) for r in range(p)]
            recv = [sum(received[r * per_rank:(r + 1) * per_rank]) for r in range(p)]
            if sum(send) != flat_N.numel():
                raise ValueError(f"slot ids must lie in [0, num_slots={self.num_slots}); "
                                 f"{flat_N.numel() - sum(send)} of {flat_N.numel()} do not")
            regroup = ungroup = None
            if p > 1:
                regroup, ungroup = _regroup_permutation(recv_PS, sum(recv))
            state = DispatchState(num_tokens=num_tokens, token_index_N=token_index_N, order_N=order_N,
                                  position_TK=position_TK, send_counts=send, recv_counts=recv,
                                  tokens_per_local_slot=[sum(received[s::per_rank]) for s in range(per_rank)],
                                  regroup_R=regroup, ungroup_R=ungroup)
            return _GatherCopies.apply(x_TD, token_index_N, position_TK), state

    def token_dispatch(self, x_ND: Tensor, state: DispatchState) -> Tensor:
        """The dispatch all-to-all: copies travel to the ranks of their slots."""
        with record_function("dualmoe/moe/dispatch"):
            if self.ep_group is None:
                return x_ND
            return _AllToAll.apply(x_ND, state.send_counts, state.recv_counts, self.ep_group)

    def dispatch_postprocess(self, x_RD: Tensor, state: DispatchState) -> Tensor:
        """Group the received rows by local slot (sizes: `state.tokens_per_local_slot`)."""
        if state.regroup_R is None:
            return x_RD
        with record_function("dualmoe/moe/dispatch_postprocess"):
            return _PermuteRows.apply(x_RD, state.regroup_R, state.ungroup_R)

    def combine_preprocess(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """Undo `dispatch_postprocess`: back to source-rank-major order."""
        if state.ungroup_R is None:
            return y_RD
        with record_function("dualmoe/moe/combine_preprocess"):
            return _PermuteRows.apply(y_RD, state.ungroup_R, state.regroup_R)

    def token_combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """The combine all-to-all: expert outputs travel back to their tokens' ranks."""
        with record_function("dualmoe/moe/combine"):
            if self.ep_group is None:
                return y_RD
            return _AllToAll.apply(y_RD, state.recv_counts, state.send_counts, self.ep_group)

    def combine_postprocess(self, y_ND: Tensor, topk_weights_TK: Tensor, state: DispatchState) -> Tensor:
        """Weight each copy by its gate value and sum the K copies of every token (in fp32 or wider).

        Args:
            y_ND: [N, D] expert outputs in slot order (as `dispatch_preprocess` sorted them).
            topk_weights_TK: [T, K] gate values.
            state: this dispatch's state.

        Returns:
            [T, D] in `y_ND`'s dtype.
        """
        with record_function("dualmoe/moe/combine_postprocess"):
            return _WeightedCombine.apply(y_ND, topk_weights_TK, state.order_N, state.position_TK,
                                          state.token_index_N)
