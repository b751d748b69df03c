"""The schedule engine on NCCL (2 GPUs): every receive-posting mode gives the single-process reference's numbers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, batches, loss_fn, mlp_specs, reference

pytestmark = [pytest.mark.gpu, pytest.mark.dist]

MODES = ("at_use", "at_use_overlap", "ahead")
SCHEDULES = ("1f1b", "dualpipev")


def _run(rank: int, world_size: int) -> list[dict[str, Any]]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="nccl")
    out = []
    for schedule in SCHEDULES:
        for mode in MODES:
            model = PipelineModule(mlp_specs(4), num_stages=2, loss_fn=loss_fn, seed_layers=True,
                                   base_seed=BASE_SEED, partition_method="uniform")
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                      "steps_per_print": 10**6, "gradient_clipping": 0.0,
                      "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                      "pipeline": {"schedule": schedule, "partition_method": "uniform", "recv_posting": mode}}
            engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
            assert (engine._comm._recv_stream is None) == (mode == "at_use")
            grads: dict[str, Any] = {}
            step = engine.optimizer.step

            def capture(_step: Any = step, _engine: Any = engine, _grads: dict = grads) -> Any:
                _grads.update({n: p.grad.detach().cpu().numpy() for n, p in _engine.module.named_parameters()})
                return _step()

            engine.optimizer.step = capture
            for _ in range(2):  # the second step runs on negotiated static shapes (payload-only messages)
                engine.train_batch(iter(batches("mlp", 4, seed=2, dtype=torch.float32)))
            # numpy, not tensors: a tensor result would travel as a shared-memory handle its exited rank cannot serve
            out.append({"losses": {mb: v.cpu().numpy() for mb, v in engine.micro_batch_losses.items()}, "grads": grads})
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_receive_posting_modes_match_reference_on_nccl() -> None:
    results = run_ranks(_run, 2, backend="nccl", timeout_s=300)
    ref_losses, ref_grads, _ = reference(mlp_specs(4), batches("mlp", 4, seed=2, dtype=torch.float32),
                                         dtype=torch.float32)
    runs = [(s, m) for s in SCHEDULES for m in MODES]
    for index, (schedule, mode) in enumerate(runs):
        losses = {mb: v for r in results for mb, v in r[index]["losses"].items()}
        assert sorted(losses) == [0, 1, 2, 3], (schedule, mode)
        for mb, value in losses.items():  # GPU vs CPU GEMMs: same math, another summation order
            got = torch.from_numpy(value)
            assert torch.allclose(got, ref_losses[0][mb], rtol=1e-5, atol=1e-6), (schedule, mode, mb)
        first = runs.index((schedule, MODES[0]))
        for r in results:
            assert r[index]["grads"].keys() == r[first]["grads"].keys()
            for name, array in r[index]["grads"].items():
                value = torch.from_numpy(array)
                assert torch.allclose(value, ref_grads[name], rtol=1e-4, atol=1e-6), (schedule, mode, name)
                same = torch.from_numpy(r[first]["grads"][name])
                assert torch.equal(value, same), (schedule, mode, name)  # same kernels, same order
