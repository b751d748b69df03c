"""Exception types raised by dualmoe; each message names the offending key/value and what is allowed."""

from __future__ import annotations

__all__ = ["CommTimeout", "ConfigError", "PlacementError", "ScheduleError"]


class ConfigError(ValueError):
    """A user setting (DeepSpeed JSON key, CLI flag, constructor argument) is invalid."""


class ScheduleError(ValueError):
    """A schedule is impossible: bad (P, m), a broken dependency, or a p2p order that would deadlock."""


class PlacementError(ValueError):
    """An expert placement is inconsistent (slot without expert, expert without slot, bad shape)."""


class CommTimeout(RuntimeError):
    """A distributed wait ran past its timeout; the message names rank, step and instruction/peer."""
