"""Grouped expert GEMMs and SlotExperts: math vs plain per-expert code, deferred weight grads (W split)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dualmoe.moe import experts as experts_mod
from dualmoe.moe.experts import SlotExperts, grouped_mm, grouped_mm_dx, grouped_wgrad_
from dualmoe.moe.placement import Placement, slot_exchange
from dualmoe.wgrad import WeightGradQueue

COUNTS = (3, 0, 5, 1)  # includes an empty group


def _loop(x: torch.Tensor, w: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(x[start:start + n] @ w[g].t())
        start += n
    return torch.cat(out)


def test_experts_grouped_mm_forward_dx_and_wgrad_match_loop() -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(COUNTS), 4, 6, dtype=torch.float64, requires_grad=True)
    ref = _loop(x, w, COUNTS)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    assert torch.equal(grouped_mm(x.detach(), w.detach(), COUNTS), ref.detach())
    torch.testing.assert_close(grouped_mm_dx(dy, w.detach(), COUNTS), x.grad, rtol=0, atol=1e-12)
    acc = torch.ones_like(w) * 0.5
    grouped_wgrad_(acc, dy, x.detach(), COUNTS)
    torch.testing.assert_close(acc, w.grad + 0.5, rtol=0, atol=1e-12)


def _experts(num_slots: int = 4, h: int = 6, i: int = 5) -> SlotExperts:
    torch.manual_seed(1)
    ex = SlotExperts(num_experts=num_slots, num_slots=num_slots, ep_size=1, hidden_size=h, ffn_hidden_size=i,
                     dtype=torch.float64)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    ex.refresh_slots(slot_exchange(Placement.identity(num_slots, num_slots), 0), None)
    return ex


def _dense_reference(ex: SlotExperts, x: torch.Tensor, counts: tuple[int, ...]):
    gate_up = ex.gate_up_proj.detach().clone().requires_grad_(True)
    down = ex.down_proj.detach().clone().requires_grad_(True)
    outs, start = [], 0
    for g, n in enumerate(counts):
        gate, up = (x[start:start + n] @ gate_up[g].t()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ down[g].t())
        start += n
    return torch.cat(outs), gate_up, down


def test_experts_slot_forward_backward_match_dense_per_expert_code() -> None:
    ex = _experts()
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = ex(x, COUNTS)
    y_ref, gate_up, down = _dense_reference(ex, x_ref, COUNTS)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert ex.gate_up_proj.grad is None, "homes get grads only from reduce_slot_grads"
    ex.reduce_slot_grads(slot_exchange(Placement.identity(4, 4), 0), None)
    torch.testing.assert_close(ex.gate_up_proj.grad, gate_up.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ex.down_proj.grad, down.grad, rtol=0, atol=1e-12)
    assert not ex.has_slot_grads()


def test_experts_weight_grads_go_through_the_queue_and_input_without_grad_still_trains() -> None:
    ex_now, ex_later = _experts(), _experts()
    x = torch.randn(sum(COUNTS), 6, dtype=torch.float64)  # a first-layer input: no grad needed
    dy = torch.randn(sum(COUNTS), 6, dtype=torch.float64)
    ex_now(x, COUNTS).backward(dy)
    queue = WeightGradQueue()
    ex_later.set_weight_grad_queue(queue)
    with queue.capture("mb0"):
        ex_later(x, COUNTS).backward(dy)
    assert ex_later.has_slot_grads() and queue.held_bytes() > 0
    exchange = slot_exchange(Placement.identity(4, 4), 0)
    with pytest.raises(RuntimeError, match="deferred expert weight grads are still queued"):
        ex_later.reduce_slot_grads(exchange, None)
    queue.run("mb0")
    assert queue.held_bytes() == 0
    for ex in (ex_now, ex_later):
        ex.reduce_slot_grads(exchange, None)
    assert torch.equal(ex_now.gate_up_proj.grad, ex_later.gate_up_proj.grad)
    assert torch.equal(ex_now.down_proj.grad, ex_later.down_proj.grad)


def test_experts_replicas_sum_into_one_home() -> None:
    """Two slots of expert 0: the home grad is the sum of both slots' grads."""
    ex = SlotExperts(num_experts=2, num_slots=4, ep_size=1, hidden_size=6, ffn_hidden_size=5, dtype=torch.float64)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    placement = Placement.from_physical_to_logical([0, 1, 0, 0], num_experts=2)
    exchange = slot_exchange(placement, 0)
    ex.refresh_slots(exchange, None)
    assert torch.equal(ex.slot_gate_up[2], ex.gate_up_proj[0]) and torch.equal(ex.slot_down[3], ex.down_proj[0])
    counts = (2, 3, 1, 2)
    x = torch.randn(sum(counts), 6, dtype=torch.float64)
    dy = torch.randn(sum(counts), 6, dtype=torch.float64)
    ex(x, counts).backward(dy)
    ex.reduce_slot_grads(exchange, None)
    merged = (sum(counts[g] for g in (0, 2, 3)), counts[1])
    order = torch.cat([torch.arange(0, 2), torch.arange(5, 8), torch.arange(2, 5)])
    ref = _experts(num_slots=2)
    with torch.no_grad():
        ref.gate_up_proj.copy_(ex.gate_up_proj)
        ref.down_proj.copy_(ex.down_proj)
    ref.refresh_slots(slot_exchange(Placement.identity(2, 2), 0), None)
    ref(x[order], merged).backward(dy[order])
    ref.reduce_slot_grads(slot_exchange(Placement.identity(2, 2), 0), None)
    torch.testing.assert_close(ex.gate_up_proj.grad, ref.gate_up_proj.grad, rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_experts_grouped_mm_cuda_bf16_matches_loop() -> None:
    torch.manual_seed(0)
    counts = (64, 0, 128, 32)
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    ref_y = _loop(x.float(), w.float(), counts)
    torch.testing.assert_close(grouped_mm(x, w, counts).float(), ref_y, rtol=2e-2, atol=2e-1)
    ref_dx = grouped_mm_dx(dy.float(), w.float(), counts)
    torch.testing.assert_close(grouped_mm_dx(dy, w, counts).float(), ref_dx, rtol=2e-2, atol=2e-1)
    acc, ref_acc = torch.zeros(4, 128, 256, device="cuda"), torch.zeros(4, 128, 256, device="cuda")
    grouped_wgrad_(acc, dy, x, counts)
    grouped_wgrad_(ref_acc, dy.float(), x.float(), counts)
    torch.testing.assert_close(acc, ref_acc, rtol=2e-2, atol=5e-1)
    assert not experts_mod._FAST_PATH_BROKEN, f"torch._grouped_mm fell back: {experts_mod._FAST_PATH_BROKEN}"
