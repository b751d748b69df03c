"""Batched non-blocking p2p between pipeline ranks, with shapes and dtypes negotiated per message.

Every transfer (a stage's forward outputs, or its input grads) is one *message*: a fixed-size int64
header on the host (`Groups.meta`, gloo) followed by the payload tensors on the engine's device (in one of
`Groups.payload`, by direction and sender, so a receive never queues behind a send on one NCCL stream).
The header carries the message's identity (direction, producing stage, micro-batch) and, per tensor,
dtype, shape and requires_grad (or "none", for a grad that does not exist), so any number of tensors of
any dtype (bool masks, int64 position ids) pass, and shapes may change from one micro-batch to the next.

    sender (SEND action)                      receiver
    isend header  --------- meta (gloo) -->  irecv header    posted at the RECV action, ahead of use
    isend payload ------- payload group --->  irecv payload  posted once the header arrived (`progress`)
    (completed off the critical path:                        waited only by the compute that consumes it
     reaped by `progress`, waited at `finish`)

Payload ops queue until `flush`, which launches them with one `batch_isend_irecv` per group (the engine
flushes after each action); on gloo they start at once. NCCL needs every rank of a group in its first
batched p2p, so the engine warms each payload group up with a collective first (`PipeComm.warm_up`).
NCCL and gloo match messages between two ranks in posting order, which is why the engine posts RECVs in
the lowered schedule's order; headers make a mismatch an error, not silent corruption. Waits on the host
(headers; payloads on CPU) poll with the engine's deadline and abort flag (`AbortSignal.wait`); on CUDA a
payload wait is a stream dependency, not a host sync.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ScheduleError
from .failure import AbortSignal
from .groups import Groups

__all__ = ["HEADER_LEN", "MessageKey", "PipeComm", "TensorMeta", "decode_header", "encode_header"]

HEADER_LEN = 128
_MAGIC = 0x44504D31
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}

# (direction "F" or "B", producing stage, micro-batch)
MessageKey = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """dtype/shape/requires_grad of one payload tensor; `dtype is None` marks an absent tensor (no grad)."""

    dtype: torch.dtype | None
    shape: tuple[int, ...] = ()
    requires_grad: bool = False


def encode_header(key: MessageKey, tensors: Sequence[Tensor | None]) -> Tensor:
    """The int64 header of a message: magic, key, count, then (dtype code, requires_grad, ndim, *shape) each.

    Raises:
        ScheduleError: a dtype that cannot travel, or more dims than fit in `HEADER_LEN`.
    """
    words = [_MAGIC, 0 if key[0] == "F" else 1, key[1], key[2], len(tensors)]
    for t in tensors:
        if t is None:
            words += [-1, 0, 0]
            continue
        if t.dtype not in _CODE:
            raise ScheduleError(f"message {key}: dtype {t.dtype} cannot be sent between stages; "
                                f"supported: {', '.join(str(d) for d in _DTYPES)}")
        words += [_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(words) > HEADER_LEN:
        raise ScheduleError(f"message {key}: {len(tensors)} tensors need a {len(words)}-word header "
                            f"(max {HEADER_LEN}); send fewer or flatter tensors between stages")
    return torch.tensor(words + [0] * (HEADER_LEN - len(words)), dtype=torch.int64)


def decode_header(header: Tensor) -> tuple[MessageKey, tuple[TensorMeta, ...]]:
    """Inverse of `encode_header`.

    Raises:
        ScheduleError: the buffer is not a header (messages out of order).
    """
    words = header.tolist()
    if words[0] != _MAGIC:
        raise ScheduleError(f"p2p header has magic {words[0]:#x}, not {_MAGIC:#x}: messages out of order")
    key: MessageKey = ("F" if words[1] == 0 else "B", words[2], words[3])
    metas, pos = [], 5
    for _ in range(words[4]):
        code, requires_grad, ndim = words[pos:pos + 3]
        shape = tuple(words[pos + 3:pos + 3 + ndim])
        pos += 3 + ndim
        metas.append(TensorMeta(None if code < 0 else _DTYPES[code], shape, bool(requires_grad)))
    return key, tuple(metas)


class _Done:
    """Completion of one wait done by a `_FifoWaiter` thread (gloo works only report done after wait())."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self.event.is_set() and self.error is not None:
            raise self.error
        return self.event.is_set()


class _FifoWaiter:
    """A daemon thread that waits on gloo works in posting order (one per peer and kind of work).

    Messages between two ranks complete in posting order, so one thread per (peer, kind) waits on
    each work in turn and marks it done; the main thread polls with a deadline and the abort flag.
    """

    def __init__(self, name: str) -> None:
        self._todo: queue.SimpleQueue[tuple[Any, _Done] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._todo.get()) is not None:
            work, done = item
            try:
                work.wait()
            except BaseException as err:
                done.error = err
            done.event.set()

    def watch(self, work: Any) -> _Done:
        """Start waiting on `work` after every work watched before it."""
        done = _Done()
        self._todo.put((work, done))
        return done

    def stop(self) -> None:
        """End the thread once it has finished the works it holds."""
        self._todo.put(None)


@dataclass(slots=True)
class _Recv:
    peer: int
    header: Tensor
    header_done: _Done
    tensors: list[Tensor | None] | None = None
    works: list[Any] = field(default_factory=list)
    dones: list[_Done] = field(default_factory=list)


@dataclass(slots=True)
class _Send:
    header: Tensor
    header_done: _Done
    tensors: list[Tensor]
    works: list[Any] = field(default_factory=list)
    dones: list[_Done] = field(default_factory=list)

    def done(self) -> bool:
        return (self.header_done.done() and all(d.done() for d in self.dones)
                and all(w.is_completed() for w in self.works))


class PipeComm:
    """Non-blocking messages between this rank and its pipeline peers.

    Args:
        groups: the engine's groups (`pp_global_ranks`, `payload`, `meta`).
        device: where payload tensors live (the engine's device).
        abort: deadline and abort flag for every host wait.
    """

    def __init__(self, groups: Groups, *, device: torch.device, abort: AbortSignal) -> None:
        self.groups = groups
        self.device = torch.device(device)
        self.abort = abort
        # gloo reports a work done only after wait(): such works are waited by per-peer threads.
        self._gloo_payload = dist.get_backend(groups.payload[0]) == "gloo"
        self._waiters: dict[tuple[int, str], _FifoWaiter] = {}
        self._queued: dict[int, tuple[Any, list[Any], list[_Recv | _Send]]] = {}  # id(group) -> ops, owners
        self._recvs: dict[MessageKey, _Recv] = {}
        self._sends: list[_Send] = []

    def warm_up(self) -> None:
        """One collective per payload group, so NCCL creates each communicator with all ranks present."""
        for group in self.groups.payload:
            dist.all_reduce(torch.zeros(1, device=self.device), group=group)

    def _watch(self, peer: int, kind: str, work: Any) -> _Done:
        waiter = self._waiters.get((peer, kind))
        if waiter is None:
            waiter = self._waiters[(peer, kind)] = _FifoWaiter(f"dualmoe-p2p-{kind}-pp{peer}")
        return waiter.watch(work)

    def _payload_op(self, peer: int, recv: bool, tensor: Tensor, owner: _Recv | _Send) -> None:
        me = self.groups.pp_rank
        group = self.groups.payload_group(peer, me) if recv else self.groups.payload_group(me, peer)
        op = dist.irecv if recv else dist.isend
        if self._gloo_payload:
            work = op(tensor, self.groups.to_global(peer), group=group)
            owner.dones.append(self._watch(peer, "recv" if recv else "send", work))
            return
        _, ops, owners = self._queued.setdefault(id(group), (group, [], []))
        ops.append(dist.P2POp(op, tensor, self.groups.to_global(peer), group))
        owners.append(owner)

    def post_recv(self, key: MessageKey, peer: int) -> None:
        """Post the header receive of message `key` from pipeline rank `peer` (a RECV action)."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        work = dist.irecv(header, src=self.groups.to_global(peer), group=self.groups.meta)
        self._recvs[key] = _Recv(peer, header, self._watch(peer, "header-recv", work))

    def send(self, key: MessageKey, peer: int, tensors: Sequence[Tensor | None]) -> None:
        """Send message `key` to pipeline rank `peer`: header now, payload now (gloo) or at `flush` (NCCL)."""
        header = encode_header(key, tensors)
        work = dist.isend(header, dst=self.groups.to_global(peer), group=self.groups.meta)
        record = _Send(header, self._watch(peer, "header-send", work), [])
        record.tensors = [t.detach().contiguous() for t in tensors if t is not None]
        for t in record.tensors:
            self._payload_op(peer, False, t, record)
        self._sends.append(record)

    def _post_payload(self, key: MessageKey, recv: _Recv) -> None:
        got, metas = decode_header(recv.header)
        if got != key:
            raise ScheduleError(f"expected message {key} from pp rank {recv.peer} but got {got}: the two ranks run "
                                f"different schedules or post messages in different orders")
        recv.tensors = [None if m.dtype is None else torch.empty(m.shape, dtype=m.dtype, device=self.device)
                        for m in metas]
        for t, m in zip(recv.tensors, metas):
            if t is not None:
                self._payload_op(recv.peer, True, t, recv)
                t.requires_grad_(m.requires_grad)

    def _post_arrived(self, until: MessageKey | None = None) -> None:
        """Post payload receives, per peer in message order, for every header that has arrived."""
        stalled: set[int] = set()
        for key, recv in self._recvs.items():
            if recv.tensors is None and recv.peer not in stalled:
                if recv.header_done.done():
                    self._post_payload(key, recv)
                else:
                    stalled.add(recv.peer)
            if key == until:
                break

    def flush(self) -> None:
        """Launch every queued payload op: one `batch_isend_irecv` per group (NCCL; gloo ops start at once)."""
        for group_ops in self._queued.values():
            _, ops, owners = group_ops
            works = dist.batch_isend_irecv(ops)
            for owner in owners:
                owner.works = works
        self._queued.clear()

    def progress(self) -> None:
        """Post payload receives whose headers arrived and drop completed sends (cheap; call often)."""
        self._post_arrived()
        self.flush()
        self._sends = [s for s in self._sends if not s.done()]

    def wait_recv(self, key: MessageKey, *, context: str) -> tuple[Tensor | None, ...]:
        """The payload of message `key` once it has arrived; tensors keep the sender's requires_grad.

        Raises:
            ScheduleError: no RECV was posted for `key`, or the header names another message.
            PeerAborted, CommTimeout: another rank failed, or the deadline passed.
        """
        recv = self._recvs.get(key)
        if recv is None:
            raise ScheduleError(f"{context}: message {key} was never posted (missing RECV action)")
        what = f"message {key} from pp rank {recv.peer}"
        if recv.tensors is None:
            self.abort.wait(recv.header_done.done, context=context, what=f"the header of {what}",
                            events=(recv.header_done.event,))
            self._post_arrived(until=key)
        self.flush()
        del self._recvs[key]
        self.abort.wait(lambda: all(d.done() for d in recv.dones), context=context, what=f"the payload of {what}",
                        events=[d.event for d in recv.dones])
        for work in recv.works:
            work.wait()  # NCCL: the compute stream waits for the receive; no host sync
        return tuple(recv.tensors)

    def finish(self, *, context: str) -> None:
        """Wait until every send has completed (end of a step).

        Raises:
            ScheduleError: a received message was never consumed.
            PeerAborted, CommTimeout: another rank failed, or the deadline passed.
        """
        self.flush()
        pending = self._sends
        self.abort.wait(lambda: all(s.header_done.done() and all(d.done() for d in s.dones) for s in pending),
                        context=context, what=f"{len(pending)} sends to complete")
        for s in pending:
            for work in s.works:
                work.wait()
        self._sends = []
        if self._recvs:
            raise ScheduleError(f"{context}: messages {sorted(self._recvs)} were posted but never used")

    def reset(self) -> None:
        """Forget every message (after a failure; the process group is unusable for this step anyway)."""
        self._queued.clear()
        self._recvs.clear()
        self._sends.clear()

    def close(self) -> None:
        """Stop the waiter threads once their works finish."""
        for waiter in self._waiters.values():
            waiter.stop()
        self._waiters.clear()
