"""Batched non-blocking p2p between pipeline ranks, with shapes and dtypes negotiated per message or once.

Every transfer (a stage's forward outputs, or its input grads) is one *message*: payload tensors on the
engine's device (in one of `Groups.payload`, by direction and sender parity, so in each group a rank only
sends or only receives and a receive never queues behind a send on one NCCL stream), announced by a
fixed-size int64 header on the host (`Groups.meta`, gloo) while its shapes are not known. The header
carries the message's identity (direction, producing stage, micro-batch) and, per tensor, dtype, shape and
requires_grad (or "none", for a grad that does not exist), so any number of tensors of any dtype (bool
masks, int64 position ids) pass.

Two modes (`pipeline.static_shapes`):

    dynamic: every message                     static: first step as dynamic, then payload only
    sender   isend header -- meta (gloo) -->   sender   checks its shapes against the first step's
             isend payload --- payload -->              isend payload -------- payload ---->
    receiver irecv header at the RECV action   receiver irecv payload at the RECV action, into
             irecv payload once it arrived              buffers of the first step's shapes

Static mode learns each (train/eval, direction, stage)'s tensor metadata from the headers of the first
step that carries it; both sides switch to payload-only messages for that key at the same step boundary
(`finish`). A sender whose tensors later differ raises `ConfigError` naming the message and the fix
(`static_shapes: false`) before anything is sent, so no receive is ever posted with a wrong shape.

Posting and completion. A receive's payload is posted at its RECV action (`post_ahead`) or only when its
payload is needed (the engine's default, `pipeline.recv_posting: "at_use"`), then with every earlier
unposted receive from that peer, in message order per peer (NCCL and gloo match messages between two ranks
in posting order; the engine posts RECVs in the lowered schedule's order, and headers make a mismatch an
error, not silent corruption). Payload ops queue until `flush`, which launches them with one
`batch_isend_irecv` per group (the engine flushes after each action); on gloo they start at once and
per-peer threads wait on them (gloo reports completion only through wait()).

On CUDA a posted NCCL receive is a kernel that spins on SMs until its data comes, and cuBLAS's persistent
GEMMs beside it run up to 1.8x longer; a send does not spin, since NCCL buffers a message this size and
the send ends before its receiver posts (16 MB, NCCL 2.28, H200). So by default (`recv_behind_compute`)
receives are issued from the compute stream: the NCCL stream waits for the compute queued before the
receive, and the kernel starts only when the GPU needs the data, which has usually arrived in NCCL's buffer
by then. Otherwise (`post_ahead`, or "at_use_overlap") receives are issued from the comm's own stream, so
they start at once, beside the queued compute; the consumer's stream then waits for the receive
(`work.wait()`, no host sync) and `record_stream` keeps the buffer alive for it. Sends are issued from the
compute stream, after the compute that produced them.

Connections. NCCL creates a rank pair's p2p connection inside the `ncclGroupEnd` of their first batched
p2p, which blocks until the peer takes part: two ranks that both start by *sending* to each other, in
different groups, wait for each other forever. `warm_up(links)` therefore sets every connection the
schedule uses up front, one pair at a time in one global order (group index, sender, receiver), so no
cycle of waits can form; nothing (our deadlines, the NCCL watchdog) can interrupt a blocked
`ncclGroupEnd` later.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, ScheduleError
from .failure import AbortSignal
from .groups import Groups, payload_index

__all__ = ["HEADER_LEN", "Link", "MessageKey", "PipeComm", "TensorMeta", "decode_header", "encode_header",
           "tensor_metas"]

HEADER_LEN = 128
_MAGIC = 0x44504D31
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}

# (direction "F" or "B", producing stage, micro-batch)
MessageKey = tuple[str, int, int]
# (payload group index, sending pp rank, receiving pp rank)
Link = tuple[int, int, int]
# (train step?, direction, producing stage): messages that share tensor metadata under static shapes
_ShapeKey = tuple[bool, str, int]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """dtype/shape/requires_grad of one payload tensor; `dtype is None` marks an absent tensor (no grad)."""

    dtype: torch.dtype | None
    shape: tuple[int, ...] = ()
    requires_grad: bool = False

    def __str__(self) -> str:
        if self.dtype is None:
            return "None"
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}{'+grad' if self.requires_grad else ''}"


def tensor_metas(tensors: Sequence[Tensor | None]) -> tuple[TensorMeta, ...]:
    """The metadata a message carries for `tensors`."""
    return tuple(TensorMeta(None) if t is None else TensorMeta(t.dtype, tuple(t.shape), t.requires_grad)
                 for t in tensors)


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
            del work, done, item  # do not keep the last message's tensors alive while idle

    def watch(self, work: Any) -> _Done:
        """Start waiting on `work` after every work watched before it."""
        done = _Done()
        self._todo.put((work, done))
        return done

    def stop(self) -> None:
        """End the thread once it has finished the works it holds."""
        self._todo.put(None)


def _stop_waiters(waiters: dict[tuple[int, str], _FifoWaiter]) -> None:
    for waiter in waiters.values():
        waiter.stop()
    waiters.clear()


@dataclass(slots=True)
class _Recv:
    key: MessageKey
    peer: int
    metas: tuple[TensorMeta, ...] | None  # known up front (static shapes) or read from the header
    header: Tensor | None = None
    header_done: _Done | None = None
    tensors: list[Tensor | None] | None = None  # set once the payload receive is posted
    works: list[Any] = field(default_factory=list)
    dones: list[_Done] = field(default_factory=list)


@dataclass(slots=True)
class _Send:
    tensors: list[Tensor]
    header: Tensor | None = None  # kept alive until the header isend completes
    works: list[Any] = field(default_factory=list)
    dones: list[_Done] = field(default_factory=list)

    def host_done(self) -> bool:
        return all(d.done() for d in self.dones)

    def done(self) -> bool:
        return self.host_done() and all(w.is_completed() for w in self.works)


class PipeComm:
    """Non-blocking messages between this rank and its pipeline peers.

    Args:
        groups: the engine's groups (`pp_global_ranks`, `payload`, `meta`).
        device: where payload tensors live (the engine's device).
        abort: deadline and abort flag for every host wait.
        static_shapes: negotiate each message kind's shapes in its first step only (see the module doc).
        post_ahead: post payload receives at their RECV action (as soon as their shapes are known); False
            posts them when the payload is needed (`wait_recv`), with every earlier receive from that peer.
        recv_behind_compute: (CUDA, with post_ahead False) issue receives from the compute stream, so they
            start on the GPU after the compute queued before them instead of spinning beside it.

    Attributes:
        links_warmed: this rank's payload connections set up by `warm_up`.
        links_used: payload connections that carried a message.
        headers_sent, headers_received: header counts (static shapes: the first step's messages only).
    """

    def __init__(self, groups: Groups, *, device: torch.device, abort: AbortSignal,
                 static_shapes: bool = False, post_ahead: bool = True, recv_behind_compute: bool = False) -> None:
        self.groups = groups
        self.post_ahead = post_ahead
        if post_ahead and recv_behind_compute:
            raise ValueError("recv_behind_compute needs post_ahead=False (receives posted at use)")
        self.device = torch.device(device)
        self.abort = abort
        self.static_shapes = static_shapes
        self.links_warmed: set[Link] = set()
        self.links_used: set[Link] = set()
        self.headers_sent = self.headers_received = 0
        # gloo reports a work done only after wait(): such works are waited by per-peer threads.
        self._gloo_payload = dist.get_backend(groups.payload[0]) == "gloo"
        # receives issued from their own stream (None: from the caller's, i.e. behind the queued compute)
        self._recv_stream = torch.cuda.Stream(device=self.device) \
            if self.device.type == "cuda" and not recv_behind_compute else None
        self._waiters: dict[tuple[int, str], _FifoWaiter] = {}
        weakref.finalize(self, _stop_waiters, self._waiters)  # no idle threads outlive a dropped engine
        self._queued: dict[tuple[int, bool], tuple[list[Any], list[_Recv | _Send]]] = {}  # (group, recv?)
        self._recvs: dict[MessageKey, _Recv] = {}
        self._unposted: dict[int, deque[_Recv]] = {}  # per peer, in message order
        self._sends: deque[_Send] = deque()
        self._collectives_warm = False
        self._train = True
        self._known: dict[_ShapeKey, tuple[TensorMeta, ...]] = {}  # negotiated in a finished step
        self._learning: dict[_ShapeKey, tuple[TensorMeta, ...]] = {}  # first seen in this step

    # ---- set-up ------------------------------------------------------------------------------------------
    def warm_up(self, links: Iterable[tuple[int, int]]) -> None:
        """Create every payload communicator, then every p2p connection in `links` that is not set up yet.

        Collective over the pipeline: every rank passes the same `(src pp rank, dst pp rank)` pairs (all
        messages of the schedule). One collective per payload group creates the communicators with all
        ranks present; then each pair exchanges one element, pairs ordered by (group index, src, dst) on
        every rank, so the connection set-up inside NCCL's `ncclGroupEnd` never waits in a cycle.
        """
        if not self._collectives_warm:
            for group in self.groups.payload:
                dist.all_reduce(torch.zeros(1, device=self.device), group=group)
            self._collectives_warm = True
        me = self.groups.pp_rank
        for link in sorted({(payload_index(src, dst), src, dst) for src, dst in links} - self.links_warmed):
            index, src, dst = link
            if me not in (src, dst):
                continue
            sending = me == src
            op = dist.P2POp(dist.isend if sending else dist.irecv, torch.zeros(1, device=self.device),
                            self.groups.to_global(dst if sending else src), self.groups.payload[index])
            for work in dist.batch_isend_irecv([op]):
                work.wait()
            self.links_warmed.add(link)

    def start_step(self, *, train: bool) -> None:
        """Begin a step: training and forward-only steps keep separate static shapes (requires_grad differs)."""
        self._train = train

    # ---- static shapes ------------------------------------------------------------------------------------
    def _header_needed(self, key: MessageKey, peer: int, metas: tuple[TensorMeta, ...]) -> bool:
        """Whether a send carries a header; raises if static shapes changed since the first step."""
        if not self.static_shapes:
            return True
        shape_key = (self._train, key[0], key[1])
        first = self._known.get(shape_key)
        header = first is None
        if first is None:
            first = self._learning.setdefault(shape_key, metas)
        if first != metas:
            kind = "outputs" if key[0] == "F" else "input grads"
            raise ConfigError(
                f"pipeline.static_shapes: message {key} to pp rank {peer} (stage {key[1]} {kind}, micro-batch "
                f"{key[2]}) holds [{', '.join(map(str, metas))}] but the first message of this kind held "
                f"[{', '.join(map(str, first))}]; with static shapes every micro-batch and step must send the "
                f"same shapes and dtypes. Set \"pipeline\": {{\"static_shapes\": false}} (or build the "
                f"PipelineModule with dynamic_shape=True) to negotiate shapes per message")
        return header

    # ---- posting ------------------------------------------------------------------------------------------
    def _watch(self, peer: int, kind: str, work: Any) -> _Done:
        waiter = self._waiters.get((peer, kind))
        if waiter is None:
            waiter = self._waiters[(peer, kind)] = _FifoWaiter(f"dualmoe-p2p-{kind}-pp{peer}")
        return waiter.watch(work)

    def _payload_op(self, peer: int, recv: bool, tensor: Tensor, owner: _Recv | _Send) -> None:
        me = self.groups.pp_rank
        src, dst = (peer, me) if recv else (me, peer)
        index = payload_index(src, dst)
        self.links_used.add((index, src, dst))
        group = self.groups.payload[index]
        op = dist.irecv if recv else dist.isend
        if self._gloo_payload:
            work = op(tensor, self.groups.to_global(peer), group=group)
            owner.dones.append(self._watch(peer, "recv" if recv else "send", work))
            return
        ops, owners = self._queued.setdefault((index, recv), ([], []))
        ops.append(dist.P2POp(op, tensor, self.groups.to_global(peer), group))
        owners.append(owner)

    def post_recv(self, key: MessageKey, peer: int) -> None:
        """Post the receive of message `key` from pipeline rank `peer` (a RECV action).

        Under static shapes with the key's shapes known, the payload receive is posted now (in message order
        behind any earlier receive from `peer` still waiting for its header); otherwise the header's.
        """
        metas = self._known.get((self._train, key[0], key[1])) if self.static_shapes else None
        recv = _Recv(key, peer, metas)
        if metas is None:
            recv.header = torch.empty(HEADER_LEN, dtype=torch.int64)
            work = dist.irecv(recv.header, src=self.groups.to_global(peer), group=self.groups.meta)
            recv.header_done = self._watch(peer, "header-recv", work)
            self.headers_received += 1
        self._recvs[key] = recv
        self._unposted.setdefault(peer, deque()).append(recv)
        if self.post_ahead:
            self._post_ready(peer)

    def send(self, key: MessageKey, peer: int, tensors: Sequence[Tensor | None]) -> None:
        """Send message `key` to pipeline rank `peer`: header (while shapes are negotiated) and payload.

        Raises:
            ConfigError: static shapes, and `tensors` differ from the first message of this kind.
            ScheduleError: a dtype that cannot travel.
        """
        record = _Send([t.detach().contiguous() for t in tensors if t is not None])
        if self._header_needed(key, peer, tensor_metas(tensors)):
            record.header = encode_header(key, tensors)
            work = dist.isend(record.header, dst=self.groups.to_global(peer), group=self.groups.meta)
            record.dones.append(self._watch(peer, "header-send", work))
            self.headers_sent += 1
        for t in record.tensors:
            self._payload_op(peer, False, t, record)
        self._sends.append(record)

    def _read_header(self, recv: _Recv) -> tuple[TensorMeta, ...]:
        key = recv.key
        got, metas = decode_header(recv.header)
        if got != key:
            raise ScheduleError(f"expected message {key} from pp rank {recv.peer} but got {got}: the two ranks run "
                                f"different schedules or post messages in different orders")
        if self.static_shapes:
            self._learning.setdefault((self._train, key[0], key[1]), metas)
        recv.header = None
        return metas

    def _post_ready(self, peer: int, upto: _Recv | None = None) -> None:
        """Post payload receives from `peer`, in message order, while their shapes are known (up to `upto`)."""
        pending = self._unposted.get(peer)
        while pending:
            recv = pending[0]
            if recv.metas is None:
                if not recv.header_done.done():
                    return
                recv.metas = self._read_header(recv)
            self._post_payload(recv)
            pending.popleft()
            if recv is upto:
                return

    def _post_payload(self, recv: _Recv) -> None:
        stream = torch.cuda.stream(self._recv_stream) if self._recv_stream is not None else contextlib.nullcontext()
        with stream:  # allocated on the receive stream: the buffer belongs to it until the consumer records use
            recv.tensors = [None if m.dtype is None else torch.empty(m.shape, dtype=m.dtype, device=self.device)
                            for m in recv.metas]
        for t, m in zip(recv.tensors, recv.metas):
            if t is not None:
                self._payload_op(recv.peer, True, t, recv)
                t.requires_grad_(m.requires_grad)

    def flush(self) -> None:
        """Launch every queued payload op: one `batch_isend_irecv` per group (NCCL; gloo ops start at once)."""
        for (_, receiving), (ops, owners) in self._queued.items():
            stream = torch.cuda.stream(self._recv_stream) if receiving and self._recv_stream is not None \
                else contextlib.nullcontext()
            with stream:
                works = dist.batch_isend_irecv(ops)
            for owner in owners:
                owner.works = works
        self._queued.clear()

    def progress(self) -> None:
        """Post payload receives whose headers arrived, launch queued ops, drop completed sends (cheap)."""
        if self.post_ahead:
            for peer, pending in self._unposted.items():
                if pending:
                    self._post_ready(peer)
        self.flush()
        sends = self._sends
        while sends and sends[0].done():  # sends complete roughly in order; stop at the first pending one
            sends.popleft()

    # ---- completion ---------------------------------------------------------------------------------------
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
            headers = []  # this message's header and those of earlier messages from the peer: posted in order
            for earlier in self._unposted[recv.peer]:
                if earlier.header_done is not None:
                    headers.append(earlier.header_done)
                if earlier is recv:
                    break
            self.abort.wait(lambda: all(d.done() for d in headers), context=context, what=f"the header of {what}",
                            events=[d.event for d in headers])
            self._post_ready(recv.peer, upto=None if self.post_ahead else recv)
        self.flush()
        del self._recvs[key]
        if recv.dones:
            self.abort.wait(lambda: all(d.done() for d in recv.dones), context=context,
                            what=f"the payload of {what}", events=[d.event for d in recv.dones])
        if recv.works:
            current = torch.cuda.current_stream(self.device) if self._recv_stream is not None else None
            for work in recv.works:
                work.wait()  # NCCL: the compute stream waits for the receive; no host sync
            if current is not None:
                for t in recv.tensors:
                    if t is not None:
                        t.record_stream(current)
        return tuple(recv.tensors)

    def finish(self, *, context: str) -> None:
        """End a step: wait for host-side sends (headers, gloo payloads); shapes seen this step become known.

        Raises:
            ScheduleError: a received message was never consumed.
            PeerAborted, CommTimeout: another rank failed, or the deadline passed.
        """
        self.flush()
        pending = list(self._sends)
        self.abort.wait(lambda: all(s.host_done() for s in pending), context=context,
                        what=f"{len(pending)} sends to complete")
        # NCCL sends need no wait here: the process group keeps their tensors from reuse until they finish, and
        # making the compute stream wait would hold this rank's optimizer step behind the peer's last receive.
        self._sends.clear()
        if self._recvs:
            raise ScheduleError(f"{context}: messages {sorted(self._recvs)} were posted but never used")
        self._known.update(self._learning)
        self._learning.clear()

    def reset(self) -> None:
        """Forget every message (after a failure; the process group is unusable for this step anyway)."""
        self._queued.clear()
        self._recvs.clear()
        self._unposted.clear()
        self._sends.clear()
        self._learning.clear()

    def close(self) -> None:
        """Stop the waiter threads once their works finish."""
        _stop_waiters(self._waiters)
