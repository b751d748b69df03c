"""Failure handling: every wait has a deadline, and one rank's error reaches every rank of the engine.

A rank whose action raises posts "rank R (pp r) step S action A: Error: msg" under the engine's key in
the process group's store, logs its schedule with the failing step marked, and raises `StageError`.
Every other rank polls that key while it waits (for a p2p header, a payload, the step-end agreement)
and raises `PeerAborted` naming the failed rank, step and action as well as its own position. A rank
that dies without posting is found by the deadline: the wait raises `CommTimeout` naming the peer.

Before the step-end collectives (DP all-reduce, loss broadcast), which could block forever on a dead
peer, all ranks of the engine meet at a store counter (`AbortSignal.agree`), a wait with a deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CommTimeout
from .schedule.ir import Action

__all__ = ["AbortSignal", "PeerAborted", "StageError", "default_store", "format_schedule", "poll_until"]

logger = logging.getLogger(__name__)

_ABORT_POLL_S = 0.02


class StageError(RuntimeError):
    """A scheduled action raised on this rank; the message names rank, step and action."""


class PeerAborted(CommTimeout):
    """Another rank of the engine failed; the message names it and where this rank was waiting."""


def default_store() -> Any:
    """The default process group's store (None if unavailable)."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def format_schedule(actions: Sequence[Action], *, failed_step: int | None = None) -> str:
    """One action per line, the failing step marked with ">>"."""
    return "\n".join(f"{'>>' if step == failed_step else '  '} {step:4d}  {action}"
                     for step, action in enumerate(actions))


def poll_until(done: Callable[[], bool], *, deadline: float, on_idle: Callable[[], None] | None = None) -> bool:
    """Spin briefly, then sleep with back-off until `done()`; `on_idle` runs between polls.

    Returns:
        True if `done()` became true, False if `deadline` (time.monotonic) passed first.
    """
    spins = 0
    while not done():
        if time.monotonic() > deadline:
            return False
        if on_idle is not None:
            on_idle()
        spins += 1
        if spins > 32:
            time.sleep(min(1e-4 * (spins - 32), 2e-3))
    return True


class AbortSignal:
    """The engine's shared abort flag and step-end agreement, kept in the process group's store.

    Args:
        store: a torch.distributed Store reachable by all ranks (None disables the side channel;
            waits then rely on their deadlines only).
        prefix: key prefix unique to this engine (every rank must pass the same one).
        num_ranks: ranks of the engine (pipeline x data parallel).
        timeout_s: deadline of every wait, in seconds.
        where: this rank's name in messages, e.g. "rank 3 (pp 1, dp 1)".
        leader: whether this rank deletes finished agreement keys (exactly one rank should).
    """

    def __init__(self, store: Any, *, prefix: str, num_ranks: int, timeout_s: float, where: str,
                 leader: bool = False) -> None:
        self.store = store
        self.prefix = prefix
        self.num_ranks = num_ranks
        self.timeout_s = timeout_s
        self.where = where
        self.leader = leader
        self._next_poll = 0.0
        self._rounds = 0

    def post(self, message: str) -> None:
        """Tell every rank that this one failed (first message wins)."""
        if self.store is None:
            return
        try:
            self.store.compare_set(f"{self.prefix}/abort", "", message)
        except Exception:  # the store may be gone too; the deadline still ends the others' waits
            logger.exception("could not post the abort message to the store")

    def message(self, *, force: bool = False) -> str | None:
        """The first failure posted, or None (checks the store at most every 20 ms unless `force`)."""
        now = time.monotonic()
        if self.store is None or (now < self._next_poll and not force):
            return None
        self._next_poll = now + _ABORT_POLL_S
        key = f"{self.prefix}/abort"
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode()

    def raise_if_aborted(self, context: str, *, force: bool = False) -> None:
        """Raise `PeerAborted` if another rank posted a failure.

        Raises:
            PeerAborted: naming the failure and `context` (where this rank waited).
        """
        message = self.message(force=force)
        if message is not None:
            raise PeerAborted(f"{self.where}, {context}: stopped because {message}")

    def wait(self, done: Callable[[], bool], *, context: str, what: str,
             events: Sequence[threading.Event] = ()) -> None:
        """Wait until `done()`, watching the abort flag and the deadline.

        Args:
            done: completion test; may raise the transport's error.
            context: where this rank is ("step 3, action 1F2 (#7)").
            what: what it waits for, for the messages.
            events: events set on completion; blocking on them wakes at once instead of polling `done`.

        Raises:
            PeerAborted: another rank failed meanwhile.
            CommTimeout: `timeout_s` passed, or the transport failed (a dead peer); the message names
                `context` and `what`.
        """
        deadline = time.monotonic() + self.timeout_s
        try:
            for event in events:
                while not event.wait(timeout=_ABORT_POLL_S) and time.monotonic() <= deadline:
                    self.raise_if_aborted(context)
            finished = poll_until(done, deadline=deadline, on_idle=lambda: self.raise_if_aborted(context))
        except CommTimeout:
            raise
        except Exception as err:  # the transport failed (e.g. gloo: "Connection closed by peer")
            self.raise_if_aborted(context, force=True)
            raise CommTimeout(f"{self.where}, {context}: {what} failed: {type(err).__name__}: {err}") from err
        if not finished:
            raise CommTimeout(f"{self.where}, {context}: waited {self.timeout_s:.0f} s for {what} "
                              f"(pipeline.timeout_s); the peer is dead, hung or runs another schedule")

    def agree(self, context: str) -> None:
        """Meet all ranks of the engine before step-end collectives (a counter in the store).

        Raises:
            PeerAborted, CommTimeout: as `wait`; the timeout names the ranks that never arrived.
        """
        if self.store is None:
            return
        self._rounds += 1
        key = f"{self.prefix}/round{self._rounds}"
        self.store.add(key, 1)
        try:
            self.wait(lambda: self.store.add(key, 0) >= self.num_ranks, context=context,
                      what=f"all {self.num_ranks} ranks to finish the step")
        except CommTimeout as err:
            if isinstance(err, PeerAborted):
                raise
            arrived = self.store.add(key, 0)
            raise CommTimeout(f"{err} ({arrived} of {self.num_ranks} arrived)") from None
        if self.leader and self._rounds > 2:
            self.store.delete_key(f"{self.prefix}/round{self._rounds - 2}")
