"""Dispatch gather and weighted combine (single rank) against the plain composition they replaced.

The reference is the previous implementation: `index_select` forward (its autograd backward is an
`index_add`), and a combine that casts y to the accumulation dtype, multiplies by the gates and
`index_add`s the N copies into [T, D]. Where the new code sums in the same order the results are
bitwise equal; where only the order differs (reference: slot order, new: k = 0..K-1, fused
multiply-add) fp32 agrees to 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
from dualmoe.moe.dispatch import TokenDispatcher, _row_dots
from torch import Tensor


def _reference(x: Tensor, slots: Tensor, weights: Tensor, expert) -> Tensor:
    """Old dispatch_preprocess gather + expert + old combine_postprocess, in plain autograd ops."""
    order = torch.argsort(slots.reshape(-1), stable=True)
    token_index = order // slots.shape[1]
    x_nd = x.index_select(0, token_index)
    y_nd = expert(x_nd, slots.reshape(-1)[order])
    acc = torch.promote_types(y_nd.dtype, weights.dtype)
    gates_n = weights.reshape(-1).index_select(0, order).to(acc)
    weighted = y_nd.to(acc) * gates_n.unsqueeze(-1)
    out = weighted.new_zeros((x.shape[0], x.shape[1])).index_add(0, token_index, weighted)
    return out.to(y_nd.dtype), y_nd


def _new(x: Tensor, slots: Tensor, weights: Tensor, expert, num_slots: int) -> tuple[Tensor, Tensor]:
    dispatcher = TokenDispatcher(num_slots=num_slots)
    x_nd, state = dispatcher.dispatch_preprocess(x, slots)
    sorted_slots = slots.reshape(-1)[state.order_N]
    y_nd = expert(dispatcher.dispatch_postprocess(dispatcher.token_dispatch(x_nd, state), state), sorted_slots)
    y_nd = dispatcher.token_combine(dispatcher.combine_preprocess(y_nd, state), state)
    return dispatcher.combine_postprocess(y_nd, weights, state), y_nd


def _expert(x_nd: Tensor, slot_n: Tensor) -> Tensor:
    """A nonlinear per-slot 'expert' (deterministic, differentiable)."""
    return torch.tanh(x_nd) * (1 + slot_n.to(x_nd.dtype) / 8).unsqueeze(-1) + 0.25 * x_nd


def _inputs(num_tokens: int, top_k: int, dim: int, num_slots: int, *, dtype: torch.dtype, seed: int,
            ascending: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(num_slots, generator=gen)[:top_k] for _ in range(num_tokens)])
    if ascending:  # each token's copies appear in k order in the slot sort: same summation order as the reference
        slots = slots.sort(dim=1).values
    weights = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float32 if dtype != torch.float64 else dtype)
    grad_out = torch.randn(num_tokens, dim, generator=gen).to(dtype)
    return x, slots, weights, grad_out


def _run(fn, x: Tensor, slots: Tensor, weights: Tensor, grad_out: Tensor, *args, expert=_expert,
         device: str = "cpu") -> dict[str, Tensor]:
    """Forward + backward on `device`; outputs and grads come back on the CPU."""
    x = x.to(device, copy=True).requires_grad_(True)
    weights = weights.to(device, copy=True).requires_grad_(True)
    out, y_nd = fn(x, slots.to(device), weights, expert, *args)
    y_nd.retain_grad()
    out.backward(grad_out.to(device))
    return {k: v.cpu() for k, v in {"out": out.detach(), "x": x.grad, "w": weights.grad, "y": y_nd.grad}.items()}


_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("ascending", [False, True])
def test_dispatch_combine_fp32_matches_reference(ascending: bool) -> None:
    x, slots, weights, grad_out = _inputs(50, 4, 33, 12, dtype=torch.float32, seed=1, ascending=ascending)
    new = _run(_new, x, slots, weights, grad_out, 12)
    ref = _run(_reference, x, slots, weights, grad_out)
    # Same operations and order: the copies' grads (the experts' output grad) and the gate grads.
    assert torch.equal(new["y"], ref["y"])
    assert torch.equal(new["w"], ref["w"])
    # Sum over the K copies: k order vs slot order (bitwise when they coincide), fused multiply-add forward.
    if ascending:
        assert torch.equal(new["x"], ref["x"])
    torch.testing.assert_close(new["x"], ref["x"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new["out"], ref["out"], rtol=1e-6, atol=1e-6)


def _scale_expert(x_nd: Tensor, slot_n: Tensor) -> Tensor:
    """Multiply by 2^(slot % 3 - 1): exact in bf16, so bf16 and fp64 runs see the same expert outputs."""
    return x_nd * torch.exp2((slot_n % 3 - 1).to(x_nd.dtype)).unsqueeze(-1)


@pytest.mark.parametrize("device", _DEVICES)
def test_dispatch_combine_bf16_close_to_fp64(device: str) -> None:
    """bf16 tokens, fp32 gates (as in MoELayer). Bound: one bf16 rounding (2^-8 relative) of an fp32-accurate sum."""
    x, slots, weights, grad_out = _inputs(64, 8, 96, 16, dtype=torch.bfloat16, seed=2)
    new = _run(_new, x, slots, weights, grad_out, 16, expert=_scale_expert, device=device)
    ref = _run(_reference, x.double(), slots, weights.double(), grad_out.double(), expert=_scale_expert)
    for key in ("out", "y"):
        assert new[key].dtype == torch.bfloat16
        torch.testing.assert_close(new[key].double(), ref[key], rtol=2 ** -8, atol=1e-6, msg=key)
    # grad_x sums the K copies' bf16 grads (each already rounded once, as any bf16 backward must): compare with
    # the fp64 sum of those same copies, through the expert's exact scaling.
    order = torch.argsort(slots.reshape(-1), stable=True)
    copies = _scale_expert(new["y"].double(), slots.reshape(-1)[order])
    want_x = torch.zeros(x.shape, dtype=torch.float64).index_add(0, order // slots.shape[1], copies)
    assert new["x"].dtype == torch.bfloat16
    torch.testing.assert_close(new["x"].double(), want_x, rtol=2 ** -8, atol=1e-6)
    # Gate grads stay fp32: exact bf16 products summed in fp32 (a bf16 bmm would be off by ~2^-9 relative).
    assert new["w"].dtype == torch.float32
    torch.testing.assert_close(new["w"].double(), ref["w"], rtol=1e-5, atol=1e-5)


def test_dispatch_combine_bf16_sums_in_fp32() -> None:
    """Copies 1 and six times 2^-8 (k = 0 first) sum to 1 + 3 * 2^-7, exact in bf16; bf16 partial sums give 1."""
    num_tokens, dim = 4, 8
    gates = torch.tensor([1.0] + [2 ** -8] * 6)
    x = torch.ones(num_tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    weights = gates.repeat(num_tokens, 1).requires_grad_(True)
    slots = torch.arange(7).repeat(num_tokens, 1)
    out, _ = _new(x, slots, weights, lambda x_nd, _: x_nd * 1, 7)
    exact = torch.full_like(out, 1 + 3 * 2 ** -7)
    assert torch.equal(out, exact)
    # Dispatch backward: the copies' grads are 1 * gate, and their sum over k is again 1 + 3 * 2^-7.
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, exact)


@pytest.mark.parametrize("device", _DEVICES)
def test_dispatch_combine_is_deterministic(device: str) -> None:
    x, slots, weights, grad_out = _inputs(40, 6, 24, 16, dtype=torch.bfloat16, seed=3)
    first, second = (_run(_new, x, slots, weights, grad_out, 16, device=device) for _ in range(2))
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_dispatch_combine_gradcheck_float64() -> None:
    x, slots, weights, _ = _inputs(5, 3, 4, 6, dtype=torch.float64, seed=4)
    dispatcher = TokenDispatcher(num_slots=6)
    _, state = dispatcher.dispatch_preprocess(x, slots)
    y_nd = torch.randn(15, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: dispatcher.dispatch_preprocess(x_, slots)[0],
                                    (x.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda y_, w_: dispatcher.combine_postprocess(y_, w_, state),
                                    (y_nd, weights.clone().requires_grad_(True)))


@pytest.mark.parametrize("needs", ["y", "w"])
def test_dispatch_combine_grad_of_one_input_only(needs: str) -> None:
    x, slots, weights, grad_out = _inputs(9, 2, 5, 4, dtype=torch.float32, seed=5)
    dispatcher = TokenDispatcher(num_slots=4)
    y_nd, state = dispatcher.dispatch_preprocess(x, slots)
    y_nd.requires_grad_(needs == "y")
    weights.requires_grad_(needs == "w")
    dispatcher.combine_postprocess(y_nd, weights, state).backward(grad_out)
    ref = _run(_reference, x, slots, weights.detach(), grad_out, expert=lambda x_nd, _: x_nd)
    if needs == "y":
        assert weights.grad is None
        assert torch.equal(y_nd.grad, ref["y"])
    else:
        assert torch.equal(weights.grad, ref["w"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatch_gate_grad_dots_cuda_bmm_matches_loop(dtype: torch.dtype) -> None:
    """The CUDA branch (cuBLAS bmm, fp32 output) against the portable per-k fp32 loop on the CPU."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(300, 160, generator=gen).to(dtype)
    b = torch.randn(300, 8, 160, generator=gen).to(dtype)
    want = _row_dots(a, b, torch.float32)
    got = _row_dots(a.cuda(), b.cuda(), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, _row_dots(a.cuda(), b.cuda(), torch.float32))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
