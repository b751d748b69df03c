"""Logging helpers: rank-0 logging and warn-once; library code never configures the root logger."""

from __future__ import annotations

import logging
import os

__all__ = ["get_rank", "log_rank0", "warn_once"]

_warned: set[str] = set()


def get_rank() -> int:
    """Global rank from torch.distributed if initialised, else from the launcher's RANK, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", "0"))


def log_rank0(logger: logging.Logger, msg: str, *args: object, level: int = logging.INFO) -> None:
    """Log `msg` on global rank 0 only."""
    if get_rank() == 0:
        logger.log(level, msg, *args)


def warn_once(logger: logging.Logger, msg: str) -> None:
    """Log a warning the first time `msg` is seen in this process."""
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)
