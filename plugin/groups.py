"""Process groups of one pipeline engine, built once from DeepSpeed's grid and passed to everything else.

Ranks are named by group: `pp_rank` is a rank inside this pipeline (0..P-1), `dp_rank` a rank inside this
stage's data-parallel group; `global_rank` is the torch.distributed rank. Conversion happens here
(`pp_global_ranks`) and at the p2p boundary only.

Besides DeepSpeed's pipe and data groups, a schedule needs:

- `payload`: four groups over the pipeline's ranks for p2p payloads, one per (direction, parity of the
  sending rank): "up" messages go to a higher pipeline rank, "down" ones to a lower rank. NCCL runs the p2p
  of one communicator on one stream in order, so in each of these groups a rank only sends or only receives:
  a receive never queues behind a send that waits for a third rank (one group per direction alone would
  put "send to r+1" and "receive from r-1" on one stream);
- `meta`: a gloo group over the pipeline's ranks that carries p2p shape/dtype headers on the host, so a
  receiver reads shapes without a device sync and headers never queue behind payloads (NCCL matches p2p
  messages in order per peer and communicator);
- `shared`: one group per set of pipeline ranks that hold copies of the same parameters, over which their
  grads are summed: DualPipe's mirrored pair (r, P-1-r), or the ranks of a tied layer (embedding/head).

Timeouts. Every group built here gets the backend timeout `backend_timeout(pipeline.timeout_s)` (twice the
setting plus 30 s). The engine's own deadlines (`dualmoe.failure`) end host-side waits first and name the
rank, step and action; the backend's timeout is the last resort for what they cannot reach: a device-side
wait on a receive that never completes (the NCCL watchdog then aborts the communicator). Neither can
interrupt a host thread blocked *inside* an NCCL call: `ncclGroupEnd` of a rank pair's first p2p blocks
until the peer joins the connection setup. That is why the engine sets every p2p connection up at start
(`PipeComm.warm_up`), pair by pair in one global order, before any step can block on one.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["Groups", "backend_timeout", "build_groups", "payload_index"]


def payload_index(src: int, dst: int) -> int:
    """Index in `Groups.payload` of messages from pp rank `src` to pp rank `dst`: 2 x upward + sender parity."""
    return 2 * int(dst > src) + src % 2


def backend_timeout(timeout_s: float) -> datetime.timedelta:
    """The process-group timeout for `pipeline.timeout_s`: long enough that the engine's deadline fires first."""
    return datetime.timedelta(seconds=2 * timeout_s + 30)


@dataclass(frozen=True, slots=True, kw_only=True)
class Groups:
    """The groups one rank uses; every field is fixed for the engine's lifetime.

    Args:
        global_rank: this process's torch.distributed rank.
        pp: the pipeline group (the P ranks sharing this rank's data-parallel index).
        pp_rank: this rank's index in `pp` (its pipeline position).
        pp_global_ranks: global rank of each pipeline position, indexed by pp rank.
        dp: the data-parallel group of this pipeline position.
        dp_rank: this rank's index in `dp`.
        dp_global_ranks: global ranks of `dp`, indexed by dp rank.
        payload: payload groups (same ranks as `pp`) indexed by `2 * upward + sender pp rank % 2`.
        meta: gloo group over `pp_global_ranks` for p2p headers.
        shared: (pp ranks, group) for every set of pipeline ranks holding copies of the same parameters
            that contains this rank, ordered by the pp-rank tuple.
    """

    global_rank: int
    pp: Any
    pp_rank: int
    pp_global_ranks: tuple[int, ...]
    dp: Any
    dp_rank: int
    dp_global_ranks: tuple[int, ...]
    payload: tuple[Any, Any, Any, Any]
    meta: Any
    shared: tuple[tuple[tuple[int, ...], Any], ...] = ()

    @property
    def pp_size(self) -> int:
        """Number of pipeline ranks P."""
        return len(self.pp_global_ranks)

    @property
    def dp_size(self) -> int:
        """Data-parallel world size."""
        return len(self.dp_global_ranks)

    def to_global(self, pp_rank: int) -> int:
        """Global rank of pipeline position `pp_rank` in this rank's pipeline."""
        return self.pp_global_ranks[pp_rank]

    def payload_group(self, src: int, dst: int) -> Any:
        """The payload group of messages from pp rank `src` to pp rank `dst`."""
        return self.payload[payload_index(src, dst)]

    def shared_group(self, pp_ranks: tuple[int, ...]) -> Any:
        """The group summing grads over `pp_ranks` (which must include this rank).

        Raises:
            KeyError: no such group was built.
        """
        for ranks, group in self.shared:
            if ranks == pp_ranks:
                return group
        raise KeyError(f"no shared-grad group for pipeline ranks {pp_ranks}")


def build_groups(grid: Any, *, shared_pp_ranks: Iterable[tuple[int, ...]] = (), timeout_s: float = 300.0) -> Groups:
    """Create the groups for DeepSpeed's `PipelineParallelGrid` `grid` (collective: every rank calls it).

    Args:
        grid: `deepspeed.runtime.pipe.topology.PipelineParallelGrid` (the PipelineModule's `mpu()`).
        shared_pp_ranks: sets of pipeline ranks that hold copies of the same parameters (DualPipe pairs,
            tied layers); sets of one rank are ignored. Every rank must pass the same sets.
        timeout_s: `pipeline.timeout_s`; the groups' backend timeout is `backend_timeout(timeout_s)`.

    Returns:
        This rank's `Groups`.
    """
    topo = grid.topology()
    global_rank = dist.get_rank()
    pipes = [tuple(ranks) for ranks in topo.get_axis_comm_lists("pipe")]
    my_pipe = next(p for p in pipes if global_rank in p)
    dp_ranks = tuple(grid.get_data_parallel_group_ranks())

    timeout = backend_timeout(timeout_s)
    # new_group is collective over the world: every rank creates every group in the same order.
    mine: dict[str, Any] = {}
    for pipe in pipes:
        for name in ("payload0", "payload1", "payload2", "payload3", "meta"):
            group = dist.new_group(ranks=list(pipe), backend="gloo" if name == "meta" else None, timeout=timeout)
            if pipe == my_pipe:
                mine[name] = group

    pp_rank = my_pipe.index(global_rank)
    shared: list[tuple[tuple[int, ...], Any]] = []
    for ranks in sorted({tuple(sorted(set(s))) for s in shared_pp_ranks if len(set(s)) > 1}):
        for pipe in pipes:
            group = dist.new_group(ranks=[pipe[r] for r in ranks], timeout=timeout)
            if pipe == my_pipe and pp_rank in ranks:
                shared.append((ranks, group))

    return Groups(global_rank=global_rank, pp=grid.get_pipe_parallel_group(), pp_rank=pp_rank,
                  pp_global_ranks=my_pipe, dp=grid.get_data_parallel_group(), dp_rank=dp_ranks.index(global_rank),
                  dp_global_ranks=dp_ranks, payload=tuple(mine[f"payload{i}"] for i in range(4)),  # type: ignore[arg-type]
                  meta=mine["meta"],
                  shared=tuple(shared))
