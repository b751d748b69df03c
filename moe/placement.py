"""Runtime placement of one MoE layer's logical experts on physical slots, and the home/slot exchange.

Legend: E logical experts, S = E + R physical slots (R redundant), P expert-parallel (EP) ranks,
X = max replicas (width of `logical_to_physical`).

    physical_to_logical [S]     slot s holds logical expert physical_to_logical[s]
    logical_to_physical [E][X]  the slots of expert e, -1 padded
    replica_count       [E]     how many slots hold expert e (>= 1)

Slot s lives on EP rank s // (S/P). Every logical expert's trainable weights live on a fixed *home*
rank, e // (E/P). A slot on its expert's home rank computes with the home parameter itself; only a
slot holding another rank's expert needs a copy, in the rank's *replica buffer* (one row per distinct
remote expert). `slot_layout` orders each rank's slots for the grouped GEMM (homes, then replicas)
and `replica_exchange` says which rows each rank sends and receives so that (a) refresh: home weights
-> replica buffers, and (b) its adjoint, gradient reduction: replica grads -> summed into home grads,
are each one variable-split all-to-all. With R = 0 (or one rank) there is nothing to exchange. A
rebalance changes only `physical_to_logical`; homes (and so optimizer state) never move.

Plan layer: pure Python integers, no torch at import time, deterministic. The EPLB planner returns
`physical_to_logical` rows and builds placements with `Placement.from_physical_to_logical`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dualmoe.errors import PlacementError

__all__ = [
    "Placement",
    "ReplicaExchange",
    "SlotLayout",
    "home_rank",
    "remote_experts_by_rank",
    "replica_exchange",
    "slot_layout",
    "slots_are_home_local",
]


def home_rank(expert: int, *, num_experts: int, num_ranks: int) -> int:
    """EP rank that owns logical `expert`'s trainable weights: experts are split in equal blocks.

    Raises:
        PlacementError: num_experts is not divisible by num_ranks.
    """
    if num_experts % num_ranks:
        raise PlacementError(f"num_experts={num_experts} must be divisible by the EP size {num_ranks} "
                             "(each EP rank is home to the same number of experts)")
    return expert // (num_experts // num_ranks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where each logical expert of one layer lives; checked on construction.

    Raises:
        PlacementError: inconsistent maps (a slot without a valid expert, an expert without a slot,
            maps that disagree, S not divisible by num_ranks).
    """

    num_experts: int
    """E logical experts."""
    num_ranks: int
    """P EP ranks the slots are spread over (S/P consecutive slots each)."""
    physical_to_logical: tuple[int, ...]
    """[S] logical expert held by each slot."""
    logical_to_physical: tuple[tuple[int, ...], ...]
    """[E][X] slots of each logical expert, in replica order, padded with -1."""
    replica_count: tuple[int, ...]
    """[E] number of slots per logical expert."""

    def __post_init__(self) -> None:
        e, p2l = self.num_experts, self.physical_to_logical
        if e < 1 or self.num_ranks < 1:
            raise PlacementError(f"num_experts={e} and num_ranks={self.num_ranks} must be >= 1")
        if len(p2l) < e or len(p2l) % self.num_ranks:
            raise PlacementError(f"physical_to_logical has {len(p2l)} slots; need >= num_experts ({e}) and a "
                                 f"multiple of num_ranks ({self.num_ranks})")
        bad = [s for s, x in enumerate(p2l) if not 0 <= x < e]
        if bad:
            raise PlacementError(f"slot {bad[0]} holds expert {p2l[bad[0]]}; valid experts are 0..{e - 1}")
        slots_of = _slots_by_expert(p2l, e)
        missing = [x for x in range(e) if not slots_of[x]]
        if missing:
            raise PlacementError(f"logical expert {missing[0]} has no slot ({len(missing)} experts unplaced)")
        if len(self.replica_count) != e or len(self.logical_to_physical) != e:
            raise PlacementError(f"replica_count has {len(self.replica_count)} and logical_to_physical "
                                 f"{len(self.logical_to_physical)} rows; both need num_experts ({e})")
        width = len(self.logical_to_physical[0])
        for x in range(e):
            row, count = self.logical_to_physical[x], self.replica_count[x]
            if count != len(slots_of[x]):
                raise PlacementError(f"replica_count[{x}]={count} but {len(slots_of[x])} slots hold expert {x}")
            if len(row) != width or sorted(row[:count]) != slots_of[x] or any(v != -1 for v in row[count:]):
                raise PlacementError(f"logical_to_physical[{x}]={list(row)} disagrees with physical_to_logical "
                                     f"(expert {x} is in slots {slots_of[x]}; rows are {width} wide, -1 padded)")

    # ---- derived sizes -----------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """S physical slots."""
        return len(self.physical_to_logical)

    @property
    def slots_per_rank(self) -> int:
        """S/P slots on each EP rank."""
        return self.num_slots // self.num_ranks

    @property
    def max_replicas(self) -> int:
        """X: width of `logical_to_physical`."""
        return len(self.logical_to_physical[0])

    def rank_of_slot(self, slot: int) -> int:
        """EP rank holding `slot`."""
        return slot // self.slots_per_rank

    def experts_on_rank(self, rank: int) -> tuple[int, ...]:
        """Logical experts of the slots of `rank`, in slot order."""
        n = self.slots_per_rank
        return self.physical_to_logical[rank * n:(rank + 1) * n]

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_physical_to_logical(cls, physical_to_logical: Sequence[int], *, num_experts: int, num_ranks: int = 1,
                                 max_replicas: int | None = None) -> Placement:
        """Build the other two maps from `physical_to_logical` (replicas in ascending slot order).

        Args:
            physical_to_logical: [S] logical expert per slot.
            num_experts: E.
            num_ranks: P.
            max_replicas: width X of `logical_to_physical`; default the largest replica count.
        """
        p2l = tuple(int(x) for x in physical_to_logical)
        if any(not 0 <= x < num_experts for x in p2l):
            raise PlacementError(f"physical_to_logical={list(p2l)} has entries outside 0..{num_experts - 1}")
        slots_of = _slots_by_expert(p2l, num_experts)
        counts = tuple(len(s) for s in slots_of)
        width = max(counts) if max_replicas is None else max_replicas
        if width < max(counts):
            raise PlacementError(f"max_replicas={width} is below the largest replica count {max(counts)}")
        l2p = tuple(tuple(s) + (-1,) * (width - len(s)) for s in slots_of)
        return cls(num_experts=num_experts, num_ranks=num_ranks, physical_to_logical=p2l,
                   logical_to_physical=l2p, replica_count=counts)

    @classmethod
    def identity(cls, num_experts: int, num_slots: int, *, num_ranks: int = 1) -> Placement:
        """The initial placement: each rank's home experts, then R/P replicas of the next rank's experts.

        With one rank this is slots [0, 1, ..., E-1, 0, 1, ..., R-1] (replicas wrap modulo E). With P
        ranks, rank r holds its home block e in [r E/P, (r+1) E/P) followed by replicas of the first
        R/P experts of rank (r+1) mod P, so a replica never sits beside its original when P > 1.

        Raises:
            PlacementError: num_slots < num_experts, or E or S not divisible by num_ranks.
        """
        e, s, p = num_experts, num_slots, num_ranks
        if s < e or e % p or s % p:
            raise PlacementError(f"identity placement needs num_slots ({s}) >= num_experts ({e}) and both "
                                 f"divisible by num_ranks ({p})")
        home, extra = e // p, (s - e) // p
        p2l: list[int] = []
        for rank in range(p):
            p2l.extend(range(rank * home, (rank + 1) * home))
            nxt = (rank + 1) % p if p > 1 else rank
            p2l.extend(nxt * home + i % home for i in range(extra))
        return cls.from_physical_to_logical(p2l, num_experts=e, num_ranks=p)

    # ---- comparisons and loads -----------------------------------------------------------------
    def changed_slots(self, other: Placement) -> tuple[int, ...]:
        """Slots whose logical expert differs between `self` and `other` (= copies a switch needs)."""
        if other.num_slots != self.num_slots:
            raise PlacementError(f"cannot compare placements of {self.num_slots} and {other.num_slots} slots")
        return tuple(s for s, (a, b) in enumerate(zip(self.physical_to_logical, other.physical_to_logical))
                     if a != b)

    def rank_loads(self, load: Sequence[float]) -> tuple[float, ...]:
        """[P] load per EP rank when each expert's `load` splits evenly over its replicas."""
        if len(load) != self.num_experts:
            raise PlacementError(f"load has {len(load)} entries; need num_experts ({self.num_experts})")
        per_rank = [0.0] * self.num_ranks
        for slot, x in enumerate(self.physical_to_logical):
            per_rank[self.rank_of_slot(slot)] += float(load[x]) / self.replica_count[x]
        return tuple(per_rank)

    def balancedness(self, load: Sequence[float]) -> float:
        """mean/max of `rank_loads(load)`; 1.0 is perfect balance (and the value for zero load)."""
        loads = self.rank_loads(load)
        top = max(loads)
        return 1.0 if top <= 0 else sum(loads) / len(loads) / top

    # ---- (de)serialisation for checkpoints ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; `from_dict` rebuilds an equal placement."""
        return {"num_experts": self.num_experts, "num_ranks": self.num_ranks,
                "physical_to_logical": list(self.physical_to_logical)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        """Inverse of `to_dict`."""
        return cls.from_physical_to_logical(data["physical_to_logical"], num_experts=int(data["num_experts"]),
                                            num_ranks=int(data["num_ranks"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaExchange:
    """One rank's side of the home -> replica all-to-all (refresh); reversed, it sums replica grads into homes.

    Refresh: `send = home[send_index]` split by `send_counts` (per destination EP rank); the received rows,
    split by `recv_counts` (per source EP rank), go to replica rows `recv_index`. Gradient reduction is the
    same exchange reversed: `send = replica_grad[recv_index]` split by `recv_counts`; the received rows, split
    by `send_counts`, are added into `home_grad[send_index]`.
    """

    send_index: tuple[int, ...]
    """Local home rows (index into this rank's E/P homes) to send, grouped by destination rank."""
    send_counts: tuple[int, ...]
    """[P] rows sent to each EP rank."""
    recv_index: tuple[int, ...]
    """Replica rows (index into this rank's replica buffer) to fill, grouped by source rank."""
    recv_counts: tuple[int, ...]
    """[P] rows received from each EP rank."""
    any_rows: bool
    """Some rank of the group sends a row: the collective is needed (the same answer on every rank)."""

    @property
    def fills_all(self) -> bool:
        """True when the received rows are the whole replica buffer in order (written without an index)."""
        return self.recv_index == tuple(range(len(self.recv_index)))


@dataclass(frozen=True, slots=True, kw_only=True)
class SlotLayout:
    """How one EP rank computes its slots: home experts in place, other ranks' experts from replica buffers.

    Rows arrive at a rank grouped by *compute position*, a permutation of its S/P local slots: first the
    slots holding this rank's home experts (by home index, replicas of one home side by side), then the
    slots holding remote experts (by expert id, so grouped by home rank). A position's *group* is the
    weight it uses: a home row h in [0, E/P), or replica row E/P + r. So the grouped GEMM of the home
    part runs on the trainable home parameter itself (no copy, its dW lands in the home's `.grad`), and
    only remote experts have replica buffers, refreshed by `exchange` after each optimizer step.
    """

    ep_rank: int
    """The rank this layout is for."""
    num_home: int
    """E/P home experts per rank."""
    position_of_slot: tuple[int, ...]
    """[S] global compute position of every slot (slot s keeps its rank: position // (S/P) = s // (S/P))."""
    local_experts: tuple[int, ...]
    """[S/P] logical expert of each local slot, in slot order."""
    group_of_position: tuple[int, ...]
    """[S/P] weight group of each local position (non-decreasing): home index, or E/P + replica index."""
    replica_experts: tuple[int, ...]
    """[R_local] distinct remote logical experts held here, ascending (= grouped by home rank)."""
    exchange: ReplicaExchange
    """The full refresh of every replica of every rank."""

    @property
    def num_replicas(self) -> int:
        """Distinct remote experts held on this rank (rows of the replica buffers)."""
        return len(self.replica_experts)

    @property
    def any_remote(self) -> bool:
        """Some rank of the group holds a remote expert: refresh and reduce need the collective."""
        return self.exchange.any_rows

    def group_counts(self, rows_per_position: Sequence[int]) -> tuple[list[int], list[int]]:
        """Rows per home expert [E/P] and per replica [R_local] from the rows per local position."""
        home, replica = [0] * self.num_home, [0] * self.num_replicas
        for group, rows in zip(self.group_of_position, rows_per_position, strict=True):
            if group < self.num_home:
                home[group] += int(rows)
            else:
                replica[group - self.num_home] += int(rows)
        return home, replica


def remote_experts_by_rank(placement: Placement) -> tuple[tuple[int, ...], ...]:
    """[P] per EP rank: the distinct logical experts its slots hold whose home is another rank, ascending."""
    per_home = _per_home(placement)
    return tuple(tuple(sorted({x for x in placement.experts_on_rank(q) if x // per_home != q}))
                 for q in range(placement.num_ranks))


def replica_exchange(placement: Placement, ep_rank: int, *, held: Placement | None = None) -> ReplicaExchange:
    """The rows `ep_rank` sends and receives to fill replica buffers from the homes.

    Every rank derives its side from the same placements, so pairs match: rank r sends rank q, in q's
    replica order, the rows of r's homes that q holds as replicas; q receives them source by source.

    Args:
        placement: the layer's placement.
        ep_rank: this rank's index in the EP group.
        held: a previous placement whose replicas every rank still holds (e.g. the one before a
            rebalance): those rows are not sent again. Default: refresh every replica.
    """
    p, per_home = placement.num_ranks, _per_home(placement)
    wanted = remote_experts_by_rank(placement)
    old = [set(r) for r in remote_experts_by_rank(held)] if held is not None else [set() for _ in range(p)]
    needed = [[x for x in wanted[q] if x not in old[q]] for q in range(p)]
    send_index: list[int] = []
    send_counts = [0] * p
    for dest in range(p):
        rows = [x - ep_rank * per_home for x in needed[dest] if x // per_home == ep_rank]
        send_index.extend(rows)
        send_counts[dest] = len(rows)
    position = {x: r for r, x in enumerate(wanted[ep_rank])}
    recv_index = [position[x] for x in needed[ep_rank]]  # ascending experts: already grouped by source
    recv_counts = [sum(1 for x in needed[ep_rank] if x // per_home == src) for src in range(p)]
    return ReplicaExchange(send_index=tuple(send_index), send_counts=tuple(send_counts),
                           recv_index=tuple(recv_index), recv_counts=tuple(recv_counts),
                           any_rows=any(needed))


def slot_layout(placement: Placement, ep_rank: int) -> SlotLayout:
    """`SlotLayout` of `ep_rank` under `placement` (pure; identical inputs give identical layouts).

    Raises:
        PlacementError: num_experts not divisible by the EP size, or ep_rank out of range.
    """
    p, n, per_home = placement.num_ranks, placement.slots_per_rank, _per_home(placement)
    if not 0 <= ep_rank < p:
        raise PlacementError(f"ep_rank={ep_rank} is outside the {p} ranks of the placement")
    p2l = placement.physical_to_logical
    position_of_slot = [0] * placement.num_slots
    mine: list[int] = []
    for q in range(p):
        # Homes first (by expert), then remote experts (by expert, i.e. by home rank); ties by slot.
        ordered = sorted(range(q * n, (q + 1) * n), key=lambda s, q=q: (p2l[s] // per_home != q, p2l[s], s))
        for j, slot in enumerate(ordered):
            position_of_slot[slot] = q * n + j
        if q == ep_rank:
            mine = ordered
    replicas = remote_experts_by_rank(placement)[ep_rank]
    replica_row = {x: r for r, x in enumerate(replicas)}
    groups = tuple(p2l[s] - ep_rank * per_home if p2l[s] // per_home == ep_rank else per_home + replica_row[p2l[s]]
                   for s in mine)
    return SlotLayout(ep_rank=ep_rank, num_home=per_home, position_of_slot=tuple(position_of_slot),
                      local_experts=placement.experts_on_rank(ep_rank), group_of_position=groups,
                      replica_experts=replicas, exchange=replica_exchange(placement, ep_rank))


def slots_are_home_local(placement: Placement) -> bool:
    """True when every slot sits on its expert's home rank (R = 0 identity, or one rank): nothing to exchange.

    Every rank computes the same answer from the same placement, so all can skip the collective together.
    """
    per_home = _per_home(placement)
    return all(x // per_home == placement.rank_of_slot(s) for s, x in enumerate(placement.physical_to_logical))


def _per_home(placement: Placement) -> int:
    e, p = placement.num_experts, placement.num_ranks
    if e % p:
        raise PlacementError(f"num_experts={e} must be divisible by the EP size {p} for home experts")
    return e // p


def _slots_by_expert(physical_to_logical: Sequence[int], num_experts: int) -> list[list[int]]:
    slots: list[list[int]] = [[] for _ in range(num_experts)]
    for slot, x in enumerate(physical_to_logical):
        if 0 <= x < num_experts:
            slots[x].append(slot)
    return slots
