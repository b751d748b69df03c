"""EPLB slot migration: the transfer rounds and the store-based commit/abort agreement.

Legend: L MoE layers, E logical experts, S physical slots, P expert-parallel (EP) ranks, C slot copies.

`SlotMigration` executes one plan's slot copies (`dualmoe.moe.rebalance_plan`) for `dualmoe.moe.rebalance`:

    prepare     new placements and STAGING buffers (the new slot contents; live slots untouched)
    each round  pack rows of the home parameters -> batch_isend_irecv over the EP group -> unpack into staging
    commit      staging -> slot buffers and the new placement maps (local, cannot half-fail)

Failure. The switch is all or nothing. A local error while packing or unpacking (an exception, e.g. an
allocation failure, or one raised by `fault_hook` in tests) marks this rank failed but the rank still
sends (zeros) and receives in every round, so the peers never wait on it and the EP group stays in
lock-step. The agreement runs through the process group's store, not a collective: each rank posts
"ok" (a counter) or "abort: why"; the first rank that sees all N ok sets the decision key to "commit",
a failed rank (or any rank whose `timeout_s` expires first) sets it to "abort: ...", and
`compare_set` makes the first writer win. Every rank then obeys that one key, so no rank commits while
another aborts, even when a rank is late. (An all-reduce of an ok flag with a timeout cannot give this:
a rank whose wait timed out cannot know whether the others completed it.) A communication error
itself (a dead peer, a transfer past `timeout_s`) breaks the process group on gloo and NCCL alike; the
rank posts "abort" first and raises `CommTimeout`, with the old placement still in place.
"""

from __future__ import annotations

import datetime
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from dualmoe.errors import CommTimeout, ConfigError
from torch import Tensor
from torch.profiler import record_function

from .layer import MoELayer
from .placement import Placement
from .rebalance_plan import SlotCopy

__all__ = ["Agreement", "FaultHook", "Prepared", "SlotMigration", "global_rank", "make_agreement", "slot_copy_bytes"]

logger = logging.getLogger(__name__)

FaultHook = Callable[[str, int], None]
"""Test seam: called as `hook(phase, round)` with phase "pack", "unpack" (inside the per-round error
handling) or "agree" (just before this rank posts its vote)."""


def global_rank() -> int:
    """This process's global rank, 0 without an initialised process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- agreement through the store ----------------------------------------------------------------------
class Agreement:
    """Set-once commit/abort decision per round in the store (see the module docstring)."""

    def __init__(self, store: Any, *, prefix: str, num_ranks: int, leader: bool) -> None:
        self.store, self.prefix, self.num_ranks, self.leader = store, prefix, num_ranks, leader

    def decide(self, round_id: int, *, ok: bool, reason: str, timeout_s: float) -> str:
        """Vote and return the round's decision: "commit" or "abort: <why>"."""
        key = f"{self.prefix}/{round_id}"
        decision = f"{key}/decision"
        if ok:
            if self.store.add(f"{key}/ok", 1) >= self.num_ranks:
                self.store.compare_set(decision, "", "commit")
        else:
            self.store.compare_set(decision, "", f"abort: {reason}")
        try:
            self.store.wait([decision], datetime.timedelta(seconds=timeout_s))
        except Exception:  # the store raises its own timeout type; any failure to see a decision aborts
            arrived = self.store.add(f"{key}/ok", 0)
            self.store.compare_set(decision, "", f"abort: only {arrived} of {self.num_ranks} ranks were ready "
                                                 f"after {timeout_s:g} s")
        value = self.store.get(decision).decode()
        if self.leader and round_id > 2:
            for old in (f"{self.prefix}/{round_id - 2}/ok", f"{self.prefix}/{round_id - 2}/decision"):
                self.store.delete_key(old)
        return value

    def abort(self, round_id: int, reason: str) -> None:
        """Post an abort for `round_id` (before raising on a communication error)."""
        try:
            self.store.compare_set(f"{self.prefix}/{round_id}/decision", "", f"abort: {reason}")
        except Exception:  # the store may be gone too; the peers' own deadlines end their waits
            logger.exception("could not post the rebalance abort to the store")


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def make_agreement(group: dist.ProcessGroup | None, *, name: str, device: torch.device) -> Agreement | None:
    """The `Agreement` of one rebalancer over `group` (None: the default group); None without a process group.

    Collective over `group`: its rank 0 draws a fresh store key prefix per instance and broadcasts it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    store = _default_store()
    if store is None:
        raise ConfigError("the Rebalancer needs the default process group's store for its commit decision")
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    prefix = f"dualmoe/eplb/{name}/{zlib.crc32(repr(sorted(ranks)).encode()):08x}"
    # A fresh prefix per instance: rank 0 of the group draws it, a broadcast shares it.
    token = torch.zeros(1, dtype=torch.int64, device=device)
    leader = dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0
    if leader:
        token[0] = store.add(f"{prefix}/instances", 1)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(token, src=src, group=group)
    return Agreement(store, prefix=f"{prefix}/{int(token)}", num_ranks=len(list(ranks)), leader=leader)


# ---- the executor --------------------------------------------------------------------------------------
def slot_copy_bytes(layers: Sequence[MoELayer]) -> list[int]:
    """Bytes of one slot copy (gate_up + down rows) per layer."""
    return [sum(t[0].numel() * t.element_size() for t in (m.experts.slot_gate_up, m.experts.slot_down))
            for m in layers]


@dataclass(slots=True)
class Prepared:
    """This rank's side of one migration: new placements, staging buffers and where rows go."""

    placements: dict[int, Placement]
    """Layer index -> new placement, for every layer whose map changes."""
    staging: dict[int, list[Tensor]] = field(default_factory=dict)
    """Layer index -> one [changed local slots, ...] tensor per slot buffer (gate_up, down)."""
    local_slots: dict[int, list[int]] = field(default_factory=dict)
    """Layer index -> the local slot indices the staged rows go to, in staging order."""
    row_of: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, global slot) -> row in that layer's staging tensors."""


@dataclass(slots=True, kw_only=True)
class SlotMigration:
    """One rebalance's transfers on this rank: prepare, run the rounds (collective over the EP group), commit."""

    layers: Sequence[MoELayer]
    """The MoE layers (the L axis of the maps), all with one EP group and one slot dtype."""
    num_experts: int
    num_slots: int
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    device: torch.device
    timeout_s: float
    """Deadline of each transfer round."""
    agreement: Agreement | None
    """Where a communication error posts its abort."""
    round_id: int
    """The agreement round of this rebalance."""
    fault_hook: FaultHook | None = None

    def prepare(self, old_LS: Tensor, new_LS: Tensor, copies: Sequence[SlotCopy]) -> Prepared:
        """New placements of the changed layers and staging buffers for the slots this rank receives."""
        placements = {}
        for index in torch.nonzero((old_LS != new_LS).any(-1)).flatten().tolist():
            layer = self.layers[index]
            if layer.experts.has_slot_grads():
                raise RuntimeError(f"layer {layer.layer_id} has unreduced slot gradients; rebalance only at a step "
                                   "boundary (after reduce_slot_grads)")
            placements[index] = Placement.from_physical_to_logical(new_LS[index].tolist(), num_experts=self.num_experts,
                                                                   num_ranks=self.ep_size)
        prepared = Prepared(placements=placements)
        per_rank = self.num_slots // self.ep_size
        for copy in copies:
            if copy.dst_rank == self.ep_rank:
                slots = prepared.local_slots.setdefault(copy.layer, [])
                prepared.row_of[(copy.layer, copy.slot)] = len(slots)
                slots.append(copy.slot - self.ep_rank * per_rank)
        for index, slots in prepared.local_slots.items():
            experts = self.layers[index].experts
            prepared.staging[index] = [t.new_empty((len(slots), *t.shape[1:]))
                                       for t in (experts.slot_gate_up, experts.slot_down)]
        return prepared

    def run(self, rounds: Sequence[Sequence[SlotCopy]], prepared: Prepared | None) -> tuple[bool, str, int, int]:
        """Every round in order; after the first local failure the later rounds only keep the lock-step.
        Returns (ok, reason of the first failure, bytes sent, bytes received)."""
        ok, reason = True, ""
        sent = received = 0
        for index, copies in enumerate(rounds):
            round_ok, round_reason, s, r = self.transfer(index, copies, prepared if ok else None)
            sent, received = sent + s, received + r
            if ok and not round_ok:
                ok, reason = False, round_reason
        return ok, reason, sent, received

    def transfer(self, index: int, copies: Sequence[SlotCopy],
                 prepared: Prepared | None) -> tuple[bool, str, int, int]:
        """One round: every rank posts the same sends/receives whatever its local state. Returns
        (ok, reason, bytes sent, bytes received)."""
        me = self.ep_rank
        sizes = slot_copy_bytes(self.layers)
        dtype = self.layers[0].experts.slot_gate_up.dtype
        itemsize = self.layers[0].experts.slot_gate_up.element_size()
        outgoing: dict[int, list[SlotCopy]] = {}
        incoming: dict[int, list[SlotCopy]] = {}
        for copy in copies:
            if copy.is_local:
                continue
            if copy.src_rank == me:
                outgoing.setdefault(copy.dst_rank, []).append(copy)
            if copy.dst_rank == me:
                incoming.setdefault(copy.src_rank, []).append(copy)
        ok, reason = prepared is not None, ""
        payloads: dict[int, Tensor] = {}
        try:
            if self.fault_hook is not None:
                self.fault_hook("pack", index)
            if prepared is not None:
                for copy in copies:
                    if copy.is_local and copy.dst_rank == me:
                        self._stage(prepared, copy, self._rows(copy))
            for peer, items in outgoing.items():
                payloads[peer] = torch.cat([r.reshape(-1).to(dtype) for c in items for r in self._rows(c)])
        except Exception as err:  # keep the lock-step; report through the vote
            ok, reason = False, f"rank {global_rank()}: packing round {index} failed: {err!r}"
        for peer, items in outgoing.items():
            if peer not in payloads:
                numel = sum(sizes[c.layer] for c in items) // itemsize
                payloads[peer] = torch.zeros(numel, dtype=dtype, device=self.device)
        buffers = {peer: torch.empty(sum(sizes[c.layer] for c in items) // itemsize, dtype=dtype,
                                     device=self.device) for peer, items in incoming.items()}
        self._exchange(index, payloads, buffers)
        try:
            if self.fault_hook is not None:
                self.fault_hook("unpack", index)
            if ok and prepared is not None:
                for peer, items in incoming.items():
                    self._unpack(prepared, items, buffers[peer])
        except Exception as err:
            ok, reason = False, f"rank {global_rank()}: unpacking round {index} failed: {err!r}"
        sent = sum(p.numel() for p in payloads.values()) * itemsize
        received = sum(b.numel() for b in buffers.values()) * itemsize
        return ok, reason, sent, received

    @torch.no_grad()
    def commit(self, prepared: Prepared) -> None:
        """Staging -> slot buffers, then the new placements (the slots already hold the new contents)."""
        with record_function("dualmoe/moe/eplb_commit"):
            for index, placement in prepared.placements.items():
                layer = self.layers[index]
                if index in prepared.staging:
                    slot_index = torch.tensor(prepared.local_slots[index], dtype=torch.long, device=self.device)
                    for live, staged in zip((layer.experts.slot_gate_up, layer.experts.slot_down),
                                            prepared.staging[index], strict=True):
                        live.index_copy_(0, slot_index, staged)
                layer.set_placement(placement, refresh="none")

    # ---- internals ---------------------------------------------------------------------------------------
    def _rows(self, copy: SlotCopy) -> list[Tensor]:
        experts = self.layers[copy.layer].experts
        local = copy.expert - self.ep_rank * (self.num_experts // self.ep_size)
        return [home.detach()[local] for home in (experts.gate_up_proj, experts.down_proj)]

    def _exchange(self, index: int, payloads: dict[int, Tensor], buffers: dict[int, Tensor]) -> None:
        if not payloads and not buffers:
            return
        if self.ep_group is None:
            raise RuntimeError("remote slot copies without an expert-parallel group")
        ops = []
        for peer in sorted(set(payloads) | set(buffers)):  # the same order on both ends of every pair
            global_peer = dist.get_global_rank(self.ep_group, peer)
            if peer in payloads:
                ops.append(dist.P2POp(dist.isend, payloads[peer], global_peer, group=self.ep_group))
            if peer in buffers:
                ops.append(dist.P2POp(dist.irecv, buffers[peer], global_peer, group=self.ep_group))
        try:
            for work in dist.batch_isend_irecv(ops):
                work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as err:
            message = f"rank {global_rank()} (EP rank {self.ep_rank}): EPLB transfer round {index} failed: {err}"
            if self.agreement is not None:
                self.agreement.abort(self.round_id, message)
            raise CommTimeout(f"{message}; the old placement is still in place but the expert-parallel group is "
                              "unusable") from err

    def _unpack(self, prepared: Prepared, items: Sequence[SlotCopy], flat: Tensor) -> None:
        offset = 0
        for copy in items:
            rows = []
            for staged in prepared.staging[copy.layer]:
                n = staged[0].numel()
                rows.append(flat[offset:offset + n].view(staged.shape[1:]))
                offset += n
            self._stage(prepared, copy, rows)

    @staticmethod
    def _stage(prepared: Prepared, copy: SlotCopy, rows: Sequence[Tensor]) -> None:
        row = prepared.row_of[(copy.layer, copy.slot)]
        for staged, value in zip(prepared.staging[copy.layer], rows, strict=True):
            staged[row].copy_(value)
