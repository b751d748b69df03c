"""Run a function on N processes joined by a gloo (or NCCL) process group on localhost.

    results = run_ranks(fn, world_size=4, args=(cfg,), timeout_s=120)

`fn(rank, world_size, *args)` must be a module-level function (processes are spawned). The parent
owns the rendezvous TCPStore, bound to port 0 by the OS, so no free-port race can occur. The first
rank to raise has its traceback re-raised in the parent as `RankFailure` naming the rank; a run past
`timeout_s` raises `RankTimeout` naming the ranks still running. Every child is killed before
`run_ranks` returns or raises, so nothing is left behind.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["RankFailure", "RankTimeout", "run_ranks"]


class RankFailure(RuntimeError):
    """A rank raised; the message carries its rank and traceback."""

    def __init__(self, rank: int, tb: str) -> None:
        super().__init__(f"rank {rank} failed:\n{tb}")
        self.rank = rank
        self.traceback = tb


class RankTimeout(TimeoutError):
    """Ranks were still running when the timeout expired."""


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str,
           timeout_s: float, args: tuple, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":  # one GPU per rank, chosen before NCCL picks device 0 for every rank
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # gloo connects its full mesh lazily and per pair: without this barrier a rank whose `fn` returns at
        # once could exit while a peer is still connecting, and that peer would fail with "closed by peer".
        dist.barrier()
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Flush the report, then leave without interpreter teardown: no destroy_process_group (a peer may have
        # died and destroy must not wait for it), and no chance for a gloo thread still joinable at exit to
        # abort the process after its result is computed but before the parent has it.
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int = 4, *, args: tuple = (), backend: str = "gloo",
              timeout_s: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh processes; return the per-rank results.

    Raises:
        RankFailure: a rank raised (the first one reported).
        RankTimeout: not all ranks finished within `timeout_s`.
    """
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    results: mp.Queue = ctx.Queue()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, store.port, backend, timeout_s, args, results),
                         daemon=True) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                running = sorted(set(range(world_size)) - set(outputs))
                raise RankTimeout(f"ranks {running} of {world_size} still running after {timeout_s:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode is not None]
                if dead:
                    # A child can die without reporting (killed, segfault); give its report a moment.
                    try:
                        rank, ok, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise RankFailure(dead[0], f"process exited with code {procs[dead[0]].exitcode} "
                                                   "without reporting") from None
                else:
                    continue
            if not ok:
                raise RankFailure(rank, payload)
            outputs[rank] = payload
        return [outputs[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results.close()
        del store
