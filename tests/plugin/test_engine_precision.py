"""DeepSpeed's precision and ZeRO paths under the schedule engine: ZeRO-1 fp32 exact, bf16 and fp16 close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import Case, check_against_reference, reference, train

pytestmark = pytest.mark.dist


def test_engine_zero1_fp32_updates_match_reference() -> None:
    # ZeRO-1 partitions optimizer state over DP; grads are not kept, so compare the updated weights.
    case = Case(kinds=("zbv", "dualpipe"), pipe=2, dp=2, micro_batches=4, num_layers=4, steps=2, lr=0.1,
                extra=(("zero_optimization", {"stage": 1}),))
    check_against_reference(case, run_ranks(train, 4, args=(case,), timeout_s=240), grads=False, weights=True)


def test_engine_bf16_runs_close_to_fp32_reference() -> None:
    # bf16 ZeRO-0 (BF16_Optimizer, fp32 grad accumulation; dualpipe sums its copies' fp32 grads) and bf16
    # ZeRO-1; three SGD steps.
    cases = [Case(kinds=("dualpipev", "zb1p", "dualpipe"), pipe=2, micro_batches=4, num_layers=4, steps=3, lr=0.1,
                  dtype="bf16"),
             Case(kinds=("dualpipe",), pipe=2, micro_batches=4, num_layers=4, steps=3, lr=0.1, dtype="bf16",
                  extra=(("zero_optimization", {"stage": 1}),))]
    for case in cases:
        results = run_ranks(train, 2, args=(case,), timeout_s=240)
        ref_losses, _, ref_weights = reference(case.specs(), case.data(torch.float32), dtype=torch.float32,
                                               steps=case.steps, lr=case.lr)
        for kind in case.kinds:
            for step in range(case.steps):
                got = {mb: v for r in results for mb, v in r[kind]["losses"][step].items()}
                assert sorted(got) == list(range(case.micro_batches))
                for mb, value in got.items():
                    np.testing.assert_allclose(value, ref_losses[step][mb].numpy(), rtol=3e-2, err_msg=kind)
            for name, ref in ref_weights.items():
                got = next(r[kind]["weights"][name] for r in results if name in r[kind]["weights"])
                assert np.abs(got - ref.numpy()).max() <= 2e-2 * max(1.0, float(ref.abs().max())), (kind, name)
            # Training moved the weights: the comparison is not between two untouched initialisations.
            first = next(r[kind]["weights"]["0.fc1.weight"] for r in results if "0.fc1.weight" in r[kind]["weights"])
            assert np.abs(first - ref_weights["0.fc1.weight"].numpy()).max() < \
                np.abs(ref_weights["0.fc1.weight"].numpy() - _initial("0.fc1.weight", case)).max()


def _fp16_train(rank: int, world_size: int, case: Case) -> dict:
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed asks this CPU for mkldnn fp16 kernels it lacks; torch computes fp16 on CPU anyway.
    get_accelerator().is_fp16_supported = lambda: True
    return train(rank, world_size, case)


def test_engine_fp16_scales_the_loss_and_skips_overflowing_steps() -> None:
    # ZeRO-0 fp16 (FP16_UnfusedOptimizer, loss scale 2^8): the last stage scales the loss as the optimizer's own
    # backward() would, grads are unscaled and clipped in step(), so two SGD steps land close to fp32 SGD (DeepSpeed
    # 0.19.8's engine.backward skips this scaling for ZeRO-0, deepspeedai/DeepSpeed#8393). A loss scale of 2^40
    # overflows fp16 grads: the step is skipped and the weights stay put.
    scaled = Case(kinds=("1f1b", "dualpipe"), pipe=2, micro_batches=4, num_layers=4, steps=2, lr=0.1, dtype="fp16",
                  clip=1.0)
    results = run_ranks(_fp16_train, 2, args=(scaled,), timeout_s=240)
    _, _, ref_weights = reference(scaled.specs(), scaled.data(torch.float32), dtype=torch.float32, steps=2, lr=0.1,
                                  clip=1.0)
    _, _, start = reference(scaled.specs(), scaled.data(torch.float32), dtype=torch.float32)
    for kind in scaled.kinds:
        assert all(r[kind]["skipped"] == 0 for r in results)
        for name, ref in ref_weights.items():
            got = next(r[kind]["weights"][name] for r in results if name in r[kind]["weights"])
            # The update, not the weights: an unscaled loss would move them loss-scale times too little.
            moved, ref_moved = got - start[name].numpy(), (ref - start[name]).numpy()
            assert np.abs(moved - ref_moved).max() <= 0.05 * np.abs(ref_moved).max(), (kind, name)
    overflow = Case(kinds=("zbv",), pipe=2, micro_batches=4, num_layers=4, steps=1, lr=0.1, dtype="fp16",
                    extra=(("fp16", {"enabled": True, "initial_scale_power": 40}),))
    results = run_ranks(_fp16_train, 2, args=(overflow,), timeout_s=240)
    _, _, initial = reference(overflow.specs(), overflow.data(torch.float32), dtype=torch.float32)
    assert all(r["zbv"]["skipped"] == 1 for r in results)
    for r in results:
        for name, value in r["zbv"]["weights"].items():
            assert np.array_equal(value, initial[name].half().float().numpy()), name


def _initial(name: str, case: Case) -> np.ndarray:
    _, _, weights = reference(case.specs(), case.data(torch.float32)[:case.micro_batches], dtype=torch.float32)
    return weights[name].numpy()
