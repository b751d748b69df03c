"""Tests of the multi-process harness itself."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.harness import RankFailure, RankTimeout, run_ranks

pytestmark = pytest.mark.dist


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank one")
    time.sleep(0.2)


def _hang_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(600)


def test_run_ranks_returns_per_rank_results() -> None:
    assert run_ranks(_all_reduce_rank, world_size=3, timeout_s=60) == [3.0, 3.0, 3.0]


def test_run_ranks_surfaces_raising_rank_with_traceback() -> None:
    with pytest.raises(RankFailure, match=r"rank 1 failed:(.|\n)*ValueError: boom from rank one") as info:
        run_ranks(_raise_on_rank_one, world_size=2, timeout_s=60)
    assert info.value.rank == 1


def test_run_ranks_times_out_naming_running_rank() -> None:
    start = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0\] of 2 still running"):
        run_ranks(_hang_on_rank_zero, world_size=2, timeout_s=8)
    assert time.monotonic() - start < 30
