"""Which rank sends which expert to which slot when a placement changes, and in which round (pure).

Legend: L MoE layers, E logical experts, S physical slots, P expert-parallel (EP) ranks, C slot copies.

Under the home design every logical expert's weights live on its home rank, e // (E/P), so the source of
every copy is that home; a slot s lives on rank s // (S/P). `chunk_copies` bounds the bytes each rank
sends and receives per round (large batched p2p exchanges are known to hang NCCL; SGLang PR #30829).
Plan layer: torch tensors in, plain frozen data out, no torch.distributed; deterministic, so every rank
derives the same transfers and rounds from the same plan. Executed by `dualmoe.moe.migration`, driven by
`dualmoe.moe.rebalance`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from dualmoe.errors import ConfigError, PlacementError
from torch import Tensor

__all__ = ["SlotCopy", "chunk_copies", "plan_copies", "plan_digest"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotCopy:
    """One slot whose expert changes: `dst_rank` fetches `expert`'s weights from `src_rank` (its home)."""

    layer: int
    """Index of the layer in the planned [L, S] maps."""
    slot: int
    """Global slot index (on `dst_rank`)."""
    expert: int
    """Logical expert the slot holds after the switch."""
    src_rank: int
    """EP rank sending the weights: the expert's home, e // (E/P)."""
    dst_rank: int
    """EP rank holding the slot, slot // (S/P)."""

    @property
    def is_local(self) -> bool:
        """True when the home and the slot are on the same rank (a local copy, no transfer)."""
        return self.src_rank == self.dst_rank


def plan_copies(old_LS: Tensor | Sequence[Sequence[int]], new_LS: Tensor | Sequence[Sequence[int]], *,
                num_experts: int, num_ranks: int) -> tuple[SlotCopy, ...]:
    """The slot copies that turn placement `old_LS` into `new_LS`, ordered by (layer, slot).

    Args:
        old_LS: [L, S] deployed physical->logical maps.
        new_LS: [L, S] planned maps.
        num_experts: E (divisible by `num_ranks`: homes are equal blocks of experts).
        num_ranks: P EP ranks (S divisible by P).

    Raises:
        PlacementError: shapes differ or do not divide evenly.
    """
    old = torch.as_tensor(old_LS, dtype=torch.int64)
    new = torch.as_tensor(new_LS, dtype=torch.int64)
    if old.shape != new.shape or old.dim() != 2:
        raise PlacementError(f"old and new maps must both be [L, S]; got {tuple(old.shape)} and {tuple(new.shape)}")
    num_slots = old.shape[1]
    if num_experts % num_ranks or num_slots % num_ranks:
        raise PlacementError(f"num_experts={num_experts} and slots={num_slots} must be divisible by the EP size "
                             f"{num_ranks}")
    per_home, per_rank = num_experts // num_ranks, num_slots // num_ranks
    layer_C, slot_C = torch.nonzero(old != new, as_tuple=True)
    expert_C = new[layer_C, slot_C]
    return tuple(SlotCopy(layer=layer, slot=slot, expert=expert, src_rank=expert // per_home,
                          dst_rank=slot // per_rank)
                 for layer, slot, expert in zip(layer_C.tolist(), slot_C.tolist(), expert_C.tolist()))


def chunk_copies(copies: Sequence[SlotCopy], *, copy_bytes: Sequence[int], chunk_bytes: int,
                 num_ranks: int) -> tuple[tuple[SlotCopy, ...], ...]:
    """Split `copies` into rounds in which no rank sends, or receives, more than `chunk_bytes`.

    First fit in the given order: each copy goes to the earliest round where both its sender and its
    receiver still have room; a copy larger than `chunk_bytes` gets a round where its two ranks are
    otherwise idle. Local copies (home and slot on one rank) move no bytes and go to round 0. Pure and
    deterministic, so every rank derives the same rounds from the same plan.

    Args:
        copies: from `plan_copies`.
        copy_bytes: [L] bytes of one slot's weights in each layer.
        chunk_bytes: per-rank, per-round bound on bytes sent and on bytes received (>= 1).
        num_ranks: P.

    Returns:
        The rounds, each a tuple of copies in input order; empty when there is nothing to copy.
    """
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes={chunk_bytes}: must be >= 1 (bytes per rank per transfer round)")
    rounds: list[list[SlotCopy]] = []
    sent: list[list[int]] = []
    received: list[list[int]] = []
    first_open_send = [0] * num_ranks  # rounds before these are full for that rank
    first_open_recv = [0] * num_ranks

    def open_round() -> int:
        rounds.append([])
        sent.append([0] * num_ranks)
        received.append([0] * num_ranks)
        return len(rounds) - 1

    for copy in copies:
        if copy.is_local:
            if not rounds:
                open_round()
            rounds[0].append(copy)
            continue
        size, src, dst = int(copy_bytes[copy.layer]), copy.src_rank, copy.dst_rank
        index = max(first_open_send[src], first_open_recv[dst])
        while True:
            if index == len(rounds):
                open_round()
            s, r = sent[index][src], received[index][dst]
            if (s + size <= chunk_bytes and r + size <= chunk_bytes) or (s == 0 and r == 0):
                break
            index += 1
        rounds[index].append(copy)
        sent[index][src] += size
        received[index][dst] += size
        while first_open_send[src] < len(rounds) and sent[first_open_send[src]][src] >= chunk_bytes:
            first_open_send[src] += 1
        while first_open_recv[dst] < len(rounds) and received[first_open_recv[dst]][dst] >= chunk_bytes:
            first_open_recv[dst] += 1
    return tuple(tuple(r) for r in rounds)


def plan_digest(physical_to_logical_LS: Tensor) -> int:
    """A 63-bit digest of a [L, S] map (compared across ranks in debug mode)."""
    data = physical_to_logical_LS.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1
