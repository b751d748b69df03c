"""Messages between pipeline ranks: headers, mixed dtypes and shapes, absent grads, ordering, deadlines, abort,
static shapes (negotiated once, changes refused)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from dualmoe.errors import ConfigError, ScheduleError
from dualmoe.p2p import HEADER_LEN, TensorMeta, decode_header, encode_header

from tests.harness import run_ranks


def test_p2p_header_round_trips_dtypes_shapes_and_absent_tensors() -> None:
    tensors = [torch.zeros(2, 3, requires_grad=True), torch.arange(4), torch.ones(5, dtype=torch.bool), None,
               torch.zeros((), dtype=torch.bfloat16)]
    header = encode_header(("B", 3, 7), tensors)
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    key, metas = decode_header(header)
    assert key == ("B", 3, 7)
    assert metas == (TensorMeta(torch.float32, (2, 3), True), TensorMeta(torch.int64, (4,)),
                     TensorMeta(torch.bool, (5,)), TensorMeta(None), TensorMeta(torch.bfloat16, ()))


def test_p2p_header_rejects_what_cannot_travel() -> None:
    with pytest.raises(ScheduleError, match=r"message \('F', 0, 1\): 60 tensors need a 305-word header"):
        encode_header(("F", 0, 1), [torch.zeros(1, 1)] * 60)
    with pytest.raises(ScheduleError, match=r"dtype torch.uint16 cannot be sent"):
        encode_header(("F", 0, 1), [torch.zeros(1, dtype=torch.uint16)])
    with pytest.raises(ScheduleError, match=r"messages out of order"):
        decode_header(torch.zeros(HEADER_LEN, dtype=torch.int64))


def _comm(rank: int, timeout_s: float, *, static_shapes: bool = False) -> Any:
    import torch.distributed as dist
    from dualmoe.failure import AbortSignal, default_store
    from dualmoe.groups import Groups
    from dualmoe.p2p import PipeComm

    payload = tuple(dist.new_group([0, 1]) for _ in range(4))
    groups = Groups(global_rank=rank, pp=dist.group.WORLD, pp_rank=rank, pp_global_ranks=(0, 1),
                    dp=dist.group.WORLD, dp_rank=0, dp_global_ranks=(rank,), payload=payload,
                    meta=dist.new_group([0, 1], backend="gloo"))
    abort = AbortSignal(default_store(), prefix="p2p-test", num_ranks=2, timeout_s=timeout_s, where=f"rank {rank}")
    return PipeComm(groups, device=torch.device("cpu"), abort=abort, static_shapes=static_shapes), abort


def _message(k: int) -> list[torch.Tensor | None]:
    """Message k: shapes change with k, an int and a bool tensor ride along, a grad is absent for k = 1."""
    floats = torch.full((k + 1, 2), float(k), requires_grad=k % 2 == 0)
    absent = None if k == 1 else torch.full((1,), k, dtype=torch.bfloat16)
    return [floats, torch.arange(k + 2), torch.arange(k + 3) % 2 == 0, absent]


def _exchange(rank: int, world_size: int) -> list[Any]:
    comm, _ = _comm(rank, 30)
    comm.warm_up([(0, 1), (1, 0)])
    peer, direction = 1 - rank, ("F", "B")[rank]
    incoming = ("B", "F")[rank]
    for k in range(3):  # receives posted ahead of any send, both ranks at once
        comm.post_recv((incoming, peer, k), peer)
    for k in range(3):
        comm.send((direction, rank, k), peer, _message(k))
        comm.progress()
    received = []
    for k in (0, 1, 2):
        got = comm.wait_recv((incoming, peer, k), context=f"test message {k}")
        received.append([None if t is None else (t.dtype, t.tolist(), t.requires_grad) for t in got])
    comm.finish(context="test end")
    comm.close()
    return received


@pytest.mark.dist
def test_p2p_messages_carry_mixed_dtypes_changing_shapes_and_absent_tensors() -> None:
    for received in run_ranks(_exchange, 2, timeout_s=60):
        for k, got in enumerate(received):
            expect = [None if t is None else (t.dtype, t.tolist(), t.requires_grad) for t in _message(k)]
            assert got == expect, k


def _wrong_order(rank: int, world_size: int) -> str:
    comm, _ = _comm(rank, 30)
    if rank == 0:
        comm.send(("F", 0, 1), 1, [torch.ones(2)])
        time.sleep(1)  # the payload is never received: do not wait for it
        return ""
    comm.post_recv(("F", 0, 0), 0)
    with pytest.raises(ScheduleError, match=r"expected message \('F', 0, 0\) from pp rank 0 but got \('F', 0, 1\)"):
        comm.wait_recv(("F", 0, 0), context="recv")
    return "raised"


def _silent_peer(rank: int, world_size: int) -> list[str]:
    comm, abort = _comm(rank, 1.0)
    if rank == 1:  # alive but silent: rank 0's first wait must end by its deadline, the second by the abort
        abort.store.wait(["p2p-test/first-wait-over"])
        abort.post("rank 1 (pp 1), step 4, action 1F3: ValueError: boom")
        time.sleep(2.0)
        return []
    errors = []
    for k in range(2):
        if k == 1:
            abort.store.set("p2p-test/first-wait-over", "1")
            abort.timeout_s = 60.0
        comm.post_recv(("B", 1, k), 1)
        try:
            comm.wait_recv(("B", 1, k), context=f"step 4, action 0B{k}")
        except Exception as err:  # reported to the test
            errors.append(f"{type(err).__name__}: {err}")
    return errors


@pytest.mark.dist
def test_p2p_mismatched_order_is_an_error_not_corruption() -> None:
    assert run_ranks(_wrong_order, 2, timeout_s=60)[1] == "raised"


@pytest.mark.dist
def test_p2p_wait_ends_by_deadline_or_by_abort() -> None:
    timed_out, aborted = run_ranks(_silent_peer, 2, timeout_s=60)[0]
    assert timed_out.startswith("CommTimeout: rank 0, step 4, action 0B0: waited 1 s for the header of message "
                                "('B', 1, 0) from pp rank 1 (pipeline.timeout_s)"), timed_out
    assert aborted == ("PeerAborted: rank 0, step 4, action 0B1: stopped because rank 1 (pp 1), step 4, "
                       "action 1F3: ValueError: boom"), aborted


def _static_steps(rank: int, world_size: int) -> dict[str, Any]:
    comm, _ = _comm(rank, 30, static_shapes=True)
    comm.warm_up([(0, 1), (1, 0)])
    peer = 1 - rank
    out: dict[str, Any] = {"headers": [], "received": []}
    # Two training steps, then a forward-only step: each kind of step negotiates its own shapes once.
    for step, train in enumerate((True, True, False, False)):
        comm.start_step(train=train)
        if rank == 1:
            for mb in range(3):
                comm.post_recv(("F", 0, mb), 0)
            got = [comm.wait_recv(("F", 0, mb), context=f"step {step}") for mb in range(3)]
            out["received"].append([[(t.dtype, t.tolist(), t.requires_grad) for t in g] for g in got])
        else:
            for mb in range(3):
                x = torch.full((2, 3), float(10 * step + mb), requires_grad=train)
                comm.send(("F", 0, mb), peer, [x, torch.arange(3) + mb, torch.tensor([True, False])])
                comm.progress()
        comm.finish(context=f"step {step}")
        out["headers"].append((comm.headers_sent, comm.headers_received))
    if rank == 0:  # a later step with another shape is refused before anything is sent
        comm.start_step(train=True)
        with pytest.raises(ConfigError, match=r"pipeline\.static_shapes: message \('F', 0, 0\) to pp rank 1 \(stage "
                           r"0 outputs, micro-batch 0\) holds \[float32\[2, 4\]\+grad\] but the first message of "
                           r"this kind held \[float32\[2, 3\]\+grad, int64\[3\], bool\[2\]\]; .* Set \"pipeline\": "
                           r"\{\"static_shapes\": false\}"):
            comm.send(("F", 0, 0), peer, [torch.zeros(2, 4, requires_grad=True)])
        out["links"] = sorted(comm.links_used)
    comm.close()
    return out


@pytest.mark.dist
def test_p2p_static_shapes_negotiated_once_per_kind_of_step_and_changes_refused() -> None:
    sender, receiver = run_ranks(_static_steps, 2, timeout_s=60)
    # Headers in the first training step and the first forward-only step only.
    assert sender["headers"] == [(3, 0), (3, 0), (6, 0), (6, 0)]
    assert receiver["headers"] == [(0, 3), (0, 3), (0, 6), (0, 6)]
    for step, got in enumerate(receiver["received"]):
        train = step < 2
        for mb, tensors in enumerate(got):
            assert tensors == [(torch.float32, [[float(10 * step + mb)] * 3] * 2, train),
                               (torch.int64, [mb, mb + 1, mb + 2], False), (torch.bool, [True, False], False)]
    assert sender["links"] == [(2, 0, 1)]  # upward, sender parity 0
