"""Grouped expert GEMMs and SlotExperts: math vs plain per-expert code, deferred weight grads (W split), homes
used in place (no copies, dW straight into .grad), and the grouped_mm fast path checked against torch's own rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dualmoe.moe import grouped as grouped_mod
from dualmoe.moe.experts import SlotExperts, grouped_mm, grouped_mm_dx, grouped_wgrad_
from dualmoe.moe.placement import Placement, slot_layout
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
    # Slots on the home rank compute with the home parameter: dW lands in .grad during backward.
    torch.testing.assert_close(ex.gate_up_proj.grad, gate_up.grad, rtol=0, atol=1e-12)
    assert ex.replica_gate_up.shape[0] == 0 and ex.has_slot_grads()
    assert ex.reduce_slot_grads(None) == [ex.gate_up_proj, ex.down_proj]
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
    assert ex_later.has_slot_grads() and queue.held_bytes() > 0 and ex_later.gate_up_proj.grad is None
    with pytest.raises(RuntimeError, match="deferred expert weight grads are still queued"):
        ex_later.reduce_slot_grads(None)
    queue.run("mb0")
    assert queue.held_bytes() == 0
    for ex in (ex_now, ex_later):
        ex.reduce_slot_grads(None)
    assert torch.equal(ex_now.gate_up_proj.grad, ex_later.gate_up_proj.grad)
    assert torch.equal(ex_now.down_proj.grad, ex_later.down_proj.grad)


def test_experts_replicas_on_the_home_rank_alias_the_home_and_sum_into_it() -> None:
    """Expert 0 in three slots of one rank: no replica buffer, one group per home; grads sum into the home."""
    ex = SlotExperts(num_experts=2, num_slots=4, ep_size=1, hidden_size=6, ffn_hidden_size=5, dtype=torch.float64)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
    layout = slot_layout(Placement.from_physical_to_logical([0, 1, 0, 0], num_experts=2), 0)
    ex.set_layout(layout)
    assert layout.group_of_position == (0, 0, 0, 1) and layout.position_of_slot == (0, 3, 1, 2)
    assert ex.replica_gate_up.shape[0] == 0
    assert ex.slot_gate_up[2].data_ptr() == ex.gate_up_proj[0].data_ptr(), "a home slot is a view, not a copy"
    assert torch.equal(ex.slot_down.detach()[3], ex.down_proj[0])
    counts = (2, 3, 1, 2)  # rows per compute position: expert 0 (three slots), then expert 1
    x = torch.randn(sum(counts), 6, dtype=torch.float64)
    dy = torch.randn(sum(counts), 6, dtype=torch.float64)
    ex(x, counts).backward(dy)
    ex.reduce_slot_grads(None)
    ref = _experts(num_slots=2)
    with torch.no_grad():
        ref.gate_up_proj.copy_(ex.gate_up_proj)
        ref.down_proj.copy_(ex.down_proj)
    ref(x, (6, 2)).backward(dy)
    assert torch.equal(ex.gate_up_proj.grad, ref.gate_up_proj.grad)
    assert torch.equal(ex.down_proj.grad, ref.down_proj.grad)


def test_experts_remote_slots_use_replica_rows_and_fp32_replica_grads() -> None:
    """EP rank 0 of 2 holding a replica of rank 1's expert 3: a replica row, fp32 grads for bf16 weights, and a
    reduce without the EP group refuses to drop them."""
    ex = SlotExperts(num_experts=4, num_slots=6, ep_size=2, hidden_size=8, ffn_hidden_size=8, dtype=torch.bfloat16)
    placement = Placement.from_physical_to_logical([3, 0, 1, 2, 3, 0], num_experts=4, num_ranks=2)
    layout = slot_layout(placement, 0)
    assert layout.replica_experts == (3,) and layout.group_of_position == (0, 1, 2)
    assert layout.position_of_slot[:3] == (2, 0, 1)
    with torch.no_grad():
        ex.gate_up_proj.normal_()
        ex.down_proj.normal_()
        ex.stage_slot_rows(0, [0], torch.ones(1, 16, 8))
        ex.stage_slot_rows(1, [0], torch.ones(1, 8, 8))
    assert ex.missing_replicas(layout) == ()
    ex.set_layout(layout)
    assert torch.equal(ex.slot_gate_up[0], torch.ones(16, 8, dtype=torch.bfloat16))
    assert ex.slot_gate_up[1].data_ptr() == ex.gate_up_proj[0].data_ptr()
    x = torch.randn(7, 8, dtype=torch.bfloat16)
    ex(x, (2, 3, 2)).float().sum().backward()
    assert ex.has_slot_grads() and ex._replica_grads[0].dtype == torch.float32
    assert ex.gate_up_proj.grad.dtype == torch.bfloat16 and ex.gate_up_proj.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="no expert-parallel group"):
        ex.reduce_slot_grads(None)


def _per_group(fn, counts: tuple[int, ...], *tensors: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for g, n in enumerate(counts):
        out.append(fn(g, *(t[start:start + n] for t in tensors)))
        start += n
    return out


@pytest.mark.gpu
def test_experts_grouped_mm_cuda_bf16_matches_loop() -> None:
    torch.manual_seed(0)
    counts = (64, 0, 128, 32)
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(sum(counts), 128, device="cuda", dtype=torch.bfloat16)
    before = grouped_mod.fallback_counts()
    y, dx = grouped_mm(x, w, counts), grouped_mm_dx(dy, w, counts)
    acc = torch.full((4, 128, 256), 0.5, device="cuda")  # an fp32 accumulator, as for replica grads
    grouped_wgrad_(acc, dy, x, counts)
    assert grouped_mod.fallback_counts() == before, "grouped_mm fell back to the per-expert loop"
    xf, wf, dyf = x.float(), w.float(), dy.float()
    ref_y = torch.cat(_per_group(lambda g, a: a @ wf[g].t(), counts, xf))
    ref_dx = torch.cat(_per_group(lambda g, a: a @ wf[g], counts, dyf))
    ref_dw = torch.stack(_per_group(lambda g, a, b: a.t() @ b, counts, dyf, xf))
    torch.testing.assert_close(y.float(), ref_y, rtol=2e-2, atol=2e-1)
    torch.testing.assert_close(dx.float(), ref_dx, rtol=2e-2, atol=2e-1)
    torch.testing.assert_close(acc, ref_dw + 0.5, rtol=2e-2, atol=5e-1)
    assert torch.equal(acc[1], torch.full_like(acc[1], 0.5)), "an empty group's weight grad must be zero"


@pytest.mark.gpu
def test_experts_cuda_bf16_home_and_replica_parts_use_grouped_mm_and_match_fp32() -> None:
    """EP rank 0 of 2 (4 homes + replicas of experts 4, 5): every GEMM runs grouped_mm; fp32 reference per expert."""
    torch.manual_seed(0)
    ex = SlotExperts(num_experts=8, num_slots=12, ep_size=2, hidden_size=256, ffn_hidden_size=128,
                     dtype=torch.bfloat16, device="cuda")
    remote_gu, remote_d = torch.randn(2, 256, 256, device="cuda") * 0.05, torch.randn(2, 256, 128, device="cuda") * 0.05
    with torch.no_grad():
        ex.gate_up_proj.normal_(0.0, 0.05)
        ex.down_proj.normal_(0.0, 0.05)
        ex.stage_slot_rows(0, [4, 5], remote_gu.bfloat16())
        ex.stage_slot_rows(1, [4, 5], remote_d.bfloat16())
    ex.set_layout(slot_layout(Placement.identity(8, 12, num_ranks=2), 0))
    counts = (96, 0, 64, 32, 16, 48)
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    before = grouped_mod.fallback_counts()
    y = ex(x, counts)
    y.float().pow(2).sum().backward()
    assert grouped_mod.fallback_counts() == before, "grouped_mm fell back to the per-expert loop"
    gate_up = torch.cat([ex.gate_up_proj.detach().float(), remote_gu.bfloat16().float()]).requires_grad_(True)
    down = torch.cat([ex.down_proj.detach().float(), remote_d.bfloat16().float()]).requires_grad_(True)
    xr = x.detach().float().requires_grad_(True)

    def swiglu(g: int, a: torch.Tensor) -> torch.Tensor:
        gate, up = (a @ gate_up[g].t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ down[g].t()

    ref = torch.cat(_per_group(swiglu, counts, xr))
    ref.pow(2).sum().backward()
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731 - bf16 round-off is ~0.4% per value
    assert rel(y, ref) < 1e-2 and rel(x.grad, xr.grad) < 2e-2
    assert rel(ex.gate_up_proj.grad, gate_up.grad[:4]) < 2e-2 and rel(ex.down_proj.grad, down.grad[:4]) < 2e-2
    assert rel(ex._replica_grads[0], gate_up.grad[4:]) < 2e-2 and rel(ex._replica_grads[1], down.grad[4:]) < 2e-2


# ---- the grouped_mm fast path, validated by torch's own meta kernels (no GPU needed) ------------------------
def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(("mat_a", "mat_b"), [
    (_meta(64, 256), _meta(4, 128, 256).transpose(-2, -1)),  # forward: x @ w[g].T
    (_meta(64, 128), _meta(4, 128, 256)),  # dx: dy @ w[g]
    (_meta(64, 128).t(), _meta(64, 256)),  # dW: dy.T @ x, split along M
    (_meta(64, 260), _meta(4, 128, 260).transpose(-2, -1)),  # K = 260: 520-byte rows, not 16-byte multiples
    (_meta(64, 256, dtype=torch.float32), _meta(4, 128, 256, dtype=torch.float32).transpose(-2, -1)),
    (_meta(64, 512)[:, ::2], _meta(4, 128, 256).transpose(-2, -1)),  # strided columns
])
def test_experts_grouped_mm_layout_problem_agrees_with_torch_checks(mat_a: torch.Tensor, mat_b: torch.Tensor) -> None:
    offs = torch.tensor([16, 16, 48, 64], dtype=torch.int32, device="meta")
    problem = grouped_mod.grouped_mm_layout_problem(mat_a, mat_b)
    try:
        torch._grouped_mm(mat_a, mat_b, offs=offs)
        accepted = True
    except RuntimeError:
        accepted = False
    assert accepted == (problem is None), problem


def test_experts_fast_path_calls_pass_torch_checks_and_never_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every grouped_mm call of a bf16 forward + backward (home part and replica part, W deferred and run) goes
    through torch's meta checks as it would on a GPU: dtypes, strides, int32 offsets, no fp32 out_dtype."""
    monkeypatch.setattr(grouped_mod, "_fast_device", lambda t: True)  # meta tensors take the GPU path
    calls = []
    real = grouped_mod._GROUPED_MM
    monkeypatch.setattr(grouped_mod, "_GROUPED_MM", lambda *a, **k: calls.append(k) or real(*a, **k))
    before = grouped_mod.fallback_counts()
    ex = SlotExperts(num_experts=8, num_slots=12, ep_size=2, hidden_size=64, ffn_hidden_size=48,
                     dtype=torch.bfloat16, device="meta")
    ex.set_layout(slot_layout(Placement.identity(8, 12, num_ranks=2), 0))  # 4 homes + 2 replicas of rank 1
    queue = WeightGradQueue()
    ex.set_weight_grad_queue(queue)
    counts = (16, 0, 8, 24, 8, 16)
    x = _meta(sum(counts), 64).requires_grad_(True)
    with queue.capture("mb"):
        y = ex(x, counts)
        y.backward(torch.empty_like(y))
    queue.run("mb")
    assert y.shape == (72, 64) and x.grad.shape == (72, 64)
    assert len(calls) == 2 * (2 + 2 + 2), "fwd, dx and dW of two GEMMs for both parts"
    assert all(set(k) == {"offs"} for k in calls), "no out_dtype: torch 2.11 rejects an fp32 output"
    assert ex.gate_up_proj.grad.dtype == torch.bfloat16 and ex._replica_grads[1].dtype == torch.float32
    assert grouped_mod.fallback_counts() == before


def test_experts_unaligned_hidden_size_falls_back_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grouped_mod, "_fast_device", lambda t: True)
    w = _meta(3, 16, 12)  # K = 12 bf16 = 24 bytes per row
    y = grouped_mm(_meta(10, 12), w, (4, 0, 6))
    assert y.shape == (10, 16)
    assert any(key.startswith("fwd: mat_a leading stride 12") for key in grouped_mod.fallback_counts())
