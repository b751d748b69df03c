"""Overlap protocol: any OverlapFn gives the numbers of running F and B apart; resolution order."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from dualmoe.overlap import (
    BackwardWork,
    ForwardWork,
    ModuleOverlap,
    backward_first_overlap,
    resolve_overlap,
    run_backward,
    run_forward,
    serial_overlap,
)
from dualmoe.wgrad import WeightGradQueue, install
from torch import Tensor, nn

torch.set_num_threads(1)

HIDDEN = 8


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.norm = nn.LayerNorm(2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.norm(self.up(x))))


class HookedStage(Stage):
    """A stage class providing the reference hook (serial inside, counting calls)."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(
        cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
    ):  # reference signature, untyped like the reference
        cls.calls += 1
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            torch.autograd.backward(outputs1, output_grads1)
        return outputs0, loss0


class BadHookStage(Stage):
    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, module1, outputs1):
        raise AssertionError("never called")


def threaded_overlap(forward: ForwardWork, backward: BackwardWork) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """B on a second thread while F runs on this one: a truly concurrent interleaving."""
    errors: list[BaseException] = []

    def do_backward() -> None:
        try:
            run_backward(backward)
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    thread = threading.Thread(target=do_backward)
    thread.start()
    result = run_forward(forward)
    thread.join()
    if errors:
        raise errors[0]
    return result


def mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


def pair_setup(cls: type[Stage], *, last_stage: bool, seed: int = 0, queue: WeightGradQueue | None = None):
    """Two stage modules; micro-batch B's forward already done on module1; A's inputs ready for module0."""
    torch.manual_seed(seed)
    module0, module1 = cls().double(), cls().double()
    if queue is not None:
        install(module0, queue)
        install(module1, queue)
    gen = torch.Generator().manual_seed(seed + 1)
    x_a = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    x_b = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    label_a = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64)
    label_b = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64)
    out_b = module1(x_b)
    if last_stage:
        fw = ForwardWork(module=module0, inputs=(x_a,), loss_fn=mse, labels=(label_a,))
        bw = BackwardWork(module=module1, loss=mse(out_b, label_b))
    else:
        grad_b = torch.randn(2, 3, HIDDEN, generator=gen, dtype=torch.float64)
        fw = ForwardWork(module=module0, inputs=(x_a,))
        bw = BackwardWork(module=module1, outputs=(out_b,), output_grads=(grad_b,))
    return fw, bw, x_b


def run_pair(overlap, cls: type[Stage] = Stage, *, last_stage: bool):
    fw, bw, x_b = pair_setup(cls, last_stage=last_stage)
    outputs, loss = overlap(fw, bw)
    grads = [p.grad for p in bw.module.parameters()]
    return outputs, loss, x_b.grad, grads, [p.grad for p in fw.module.parameters()]


def assert_same(a, b) -> None:
    outputs_a, loss_a, xgrad_a, grads_a, fgrads_a = a
    outputs_b, loss_b, xgrad_b, grads_b, fgrads_b = b
    assert len(outputs_a) == len(outputs_b) == 1
    assert torch.equal(outputs_a[0], outputs_b[0])
    assert (loss_a is None) == (loss_b is None)
    if loss_a is not None:
        assert torch.equal(loss_a, loss_b)
    assert torch.equal(xgrad_a, xgrad_b)
    assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))
    assert all(g is None for g in fgrads_a + fgrads_b)  # the forward half computes no grads


def separate(fw: ForwardWork, bw: BackwardWork):
    """Reference: the F action and the B action run on their own."""
    result = run_forward(fw)
    run_backward(bw)
    return result


@pytest.mark.parametrize("last_stage", [False, True])
@pytest.mark.parametrize("overlap", [serial_overlap, backward_first_overlap, threaded_overlap])
def test_overlap_matches_running_forward_and_backward_apart(overlap, last_stage: bool) -> None:
    assert_same(run_pair(overlap, last_stage=last_stage), run_pair(separate, last_stage=last_stage))


def test_overlap_loss_backward_detaches_loss() -> None:
    fw, bw, _ = pair_setup(Stage, last_stage=True)
    _, loss0 = serial_overlap(fw, bw)
    assert bw.loss.grad_fn is None  # the graph of micro-batch B can be freed
    assert loss0.grad_fn is not None  # micro-batch A's loss still has its graph for its own B


def test_overlap_output_without_grad_is_skipped() -> None:
    torch.manual_seed(0)
    module = Stage().double()
    x = torch.randn(3, HIDDEN, dtype=torch.float64, requires_grad=True)
    out = module(x)
    side = x.detach() * 2  # a second output that carries no grad (e.g. a mask)
    bw = BackwardWork(module=module, outputs=(out, side), output_grads=(torch.ones_like(out), None))
    run_backward(bw)
    assert torch.equal(x.grad, torch.autograd.grad(module(x), x, torch.ones_like(out))[0])


def test_overlap_resolves_module_hook_and_matches() -> None:
    module0, module1 = HookedStage(), HookedStage()
    overlap = resolve_overlap(module0, module1)
    assert isinstance(overlap, ModuleOverlap) and overlap.owner is HookedStage
    before = HookedStage.calls
    for last_stage in (False, True):
        got = run_pair(overlap, HookedStage, last_stage=last_stage)
        assert_same(got, run_pair(separate, HookedStage, last_stage=last_stage))
    assert HookedStage.calls == before + 2


def test_overlap_registered_fn_wins_over_module_hook() -> None:
    assert resolve_overlap(HookedStage(), HookedStage(), backward_first_overlap) is backward_first_overlap


def test_overlap_defaults_to_serial() -> None:
    assert resolve_overlap(Stage(), Stage()) is serial_overlap


def test_overlap_hook_on_mismatched_classes_falls_back_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dualmoe.overlap"):
        assert resolve_overlap(HookedStage(), Stage()) is serial_overlap
    assert "both paired stages share a class" in caplog.text


def test_overlap_hook_with_wrong_signature_raises() -> None:
    match = r"BadHookStage\.overlapped_forward_backward.*cannot be called with 8 arguments"
    with pytest.raises(TypeError, match=match):
        resolve_overlap(BadHookStage(), BadHookStage())


def test_overlap_registered_fn_with_wrong_signature_raises() -> None:
    def one_arg(forward: ForwardWork) -> None:
        return None

    with pytest.raises(TypeError, match=r"registered OverlapFn .*one_arg.* cannot be called with 2 arguments"):
        resolve_overlap(Stage(), Stage(), one_arg)


def test_overlap_hook_bad_return_raises() -> None:
    class NoReturn(Stage):
        @classmethod
        def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
            return None

    fw, bw, _ = pair_setup(NoReturn, last_stage=False)
    with pytest.raises(TypeError, match=r"must return \(outputs0, loss0\); got NoneType"):
        resolve_overlap(fw.module, bw.module)(fw, bw)


def test_overlap_backward_work_validates() -> None:
    module = Stage()
    with pytest.raises(ValueError, match="exactly one of loss= or outputs="):
        BackwardWork(module=module)
    with pytest.raises(ValueError, match="1 outputs but 0 output_grads"):
        BackwardWork(module=module, outputs=(torch.zeros(1),))


@pytest.mark.parametrize("overlap", [serial_overlap, backward_first_overlap, threaded_overlap])
def test_overlap_composes_with_weight_grad_capture(overlap) -> None:
    ref_fw, ref_bw, ref_x_b = pair_setup(Stage, last_stage=False)
    ref_out, _ = separate(ref_fw, ref_bw)
    queue = WeightGradQueue()
    fw, bw, x_b = pair_setup(Stage, last_stage=False, queue=queue)
    with queue.capture((1, 0)):
        outputs, _ = overlap(fw, bw)
    assert torch.equal(outputs[0], ref_out[0]) and torch.equal(x_b.grad, ref_x_b.grad)
    assert bw.module.up.weight.grad is None and bw.module.norm.weight.grad is not None
    queue.run((1, 0))
    for p, q in zip(bw.module.parameters(), ref_bw.module.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
