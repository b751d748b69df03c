"""Leave SMs to spinning p2p kernels: cuBLAS's SM-count target during the schedule's actions.

A posted NCCL receive, or a send whose peer has not posted yet, is a kernel that holds its CTAs' SMs
while it waits. cuBLAS's Hopper GEMMs are persistent (one CTA per SM, in pairs): started while such a
kernel holds SMs, the CTAs left without an SM start only when it ends or other CTAs finish, and the GEMM
runs 1.4-1.8x longer (measured on H100 in `bench/pipeline.py` traces). Telling cuBLAS to target `n`
fewer SMs (torch's `_set_sm_carveout_experimental`, read at every GEMM call) keeps those SMs free.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .log import warn_once

__all__ = ["sm_carveout"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def sm_carveout(num_sms: int, device: torch.device) -> Iterator[None]:
    """cuBLAS GEMMs launched inside leave `num_sms` SMs free (no-op for 0, off CUDA, or without the torch API)."""
    if num_sms <= 0 or device.type != "cuda":
        yield
        return
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    if setter is None or getter is None:
        warn_once(logger, f"pipeline.sm_carveout={num_sms}: torch {torch.__version__} has no SM carve-out; ignored")
        yield
        return
    previous = getter()
    setter(num_sms)
    try:
        yield
    finally:
        setter(previous)
