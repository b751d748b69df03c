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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx
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
    order_N = torch.argsort(flat_N, stable=True)
    sorted_ids_N = flat_N[order_N]
    counts_E = torch.bincount(flat_N, minlength=replica_count_E.numel())
    starts_E = torch.cumsum(counts_E, 0) - counts_E
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


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@dataclass(slots=True, kw_only=True)
class DispatchState:
    """Everything the later stages of one dispatch need (one per micro-batch and layer)."""

    num_tokens: int
    """T."""
    token_index_N: Tensor
    """Source token of each sorted copy."""
    order_N: Tensor
    """Flat (token, k) index of each copy in slot order."""
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

        Returns:
            (x_ND, state): the copies in slot order, and the state for the other stages.
        """
        with record_function("dualmoe/moe/dispatch_preprocess"):
            flat_N = slot_ids_TK.reshape(-1)
            order_N = torch.argsort(flat_N, stable=True)
            token_index_N = order_N // slot_ids_TK.shape[1]
            counts_S = torch.bincount(flat_N, minlength=self.num_slots)
            p, per_rank = self.ep_size, self.num_slots // self.ep_size
            if self.ep_group is None:
                recv_PS = counts_S.view(1, per_rank)
            else:
                recv_PS = all_to_all_rows(counts_S, [per_rank] * p, [per_rank] * p, self.ep_group).view(p, per_rank)
            regroup = ungroup = None
            if p > 1:
                local_slot_R = torch.arange(per_rank, device=flat_N.device).repeat(p).repeat_interleave(
                    recv_PS.reshape(-1))
                regroup = torch.argsort(local_slot_R, stable=True)
                ungroup = _inverse(regroup)
            send, recv, per_slot = (counts_S.view(p, per_rank).sum(1), recv_PS.sum(1), recv_PS.sum(0))
            counts = torch.cat([send, recv, per_slot]).tolist()  # one device->host sync for all splits
            state = DispatchState(num_tokens=slot_ids_TK.shape[0], token_index_N=token_index_N,
                                  order_N=order_N, send_counts=counts[:p],
                                  recv_counts=counts[p:2 * p], tokens_per_local_slot=counts[2 * p:],
                                  regroup_R=regroup, ungroup_R=ungroup)
            return x_TD.index_select(0, token_index_N), state

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
            return x_RD.index_select(0, state.regroup_R)

    def combine_preprocess(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """Undo `dispatch_postprocess`: back to source-rank-major order."""
        if state.ungroup_R is None:
            return y_RD
        with record_function("dualmoe/moe/combine_preprocess"):
            return y_RD.index_select(0, state.ungroup_R)

    def token_combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        """The combine all-to-all: expert outputs travel back to their tokens' ranks."""
        with record_function("dualmoe/moe/combine"):
            if self.ep_group is None:
                return y_RD
            return _AllToAll.apply(y_RD, state.recv_counts, state.send_counts, self.ep_group)

    def combine_postprocess(self, y_ND: Tensor, topk_weights_TK: Tensor, state: DispatchState) -> Tensor:
        """Weight each copy by its gate value and sum the K copies of every token (in fp32 or wider).

        Returns:
            [T, D] in `y_ND`'s dtype.
        """
        with record_function("dualmoe/moe/combine_postprocess"):
            acc = torch.promote_types(y_ND.dtype, topk_weights_TK.dtype)
            gates_N = topk_weights_TK.reshape(-1).index_select(0, state.order_N).to(acc)
            weighted_ND = y_ND.to(acc) * gates_N.unsqueeze(-1)
            out_TD = weighted_ND.new_zeros((state.num_tokens, y_ND.shape[-1]))
            return out_TD.index_add(0, state.token_index_N, weighted_ND).to(y_ND.dtype)
