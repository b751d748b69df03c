"""Engine options: the W split really defers, a registered overlap function, split/overlap switches, traces."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, batches, loss_fn, mlp_specs, reference

pytestmark = pytest.mark.dist

VARIANTS = (
    ("zbv", {}, False),
    ("zbv", {"split_backward": False}, False),
    ("dualpipev", {}, True),  # backward-first overlap function registered
    ("dualpipev", {"overlap": False, "trace": {"enabled": True, "steps": [0]}}, False),
    ("dualpipev", {"recv_posting": "ahead"}, False),
    ("zbv", {"recv_posting": "ahead", "static_shapes": False}, False),  # payloads as soon as headers arrive
)


def _run(rank: int, world_size: int, trace_dir: str) -> list[dict[str, Any]]:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import PipelineModule
    from dualmoe.overlap import backward_first_overlap

    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for kind, options, backward_first in VARIANTS:
        model = PipelineModule(mlp_specs(4), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=BASE_SEED,
                               partition_method="uniform")
        pipeline = {"schedule": kind, "partition_method": "uniform", **options}
        if "trace" in pipeline:
            pipeline["trace"] = {**pipeline["trace"], "output_dir": trace_dir}
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
                  "gradient_clipping": 0.0, "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "pipeline": pipeline}
        engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(), config=config)
        if backward_first:
            engine.register_overlap(backward_first_overlap)
        grads: dict[str, Any] = {}
        step = engine.optimizer.step

        def capture(_step: Any = step, _engine: Any = engine, _grads: dict = grads) -> Any:
            _grads.update({n: p.grad.clone().numpy() for n, p in _engine.module.named_parameters()})
            return _step()

        engine.optimizer.step = capture
        engine.train_batch(iter(batches("mlp", 4, seed=2, dtype=torch.float32)))
        out.append({"losses": {mb: v.numpy() for mb, v in engine.micro_batch_losses.items()}, "grads": grads,
                    "held": engine._queue.peak_held_bytes()})
    return out


def test_engine_options_keep_results_and_split_really_defers(tmp_path: Any) -> None:
    results = run_ranks(_run, 2, args=(str(tmp_path),), timeout_s=240)
    ref_losses, ref_grads, _ = reference(mlp_specs(4), batches("mlp", 4, seed=2, dtype=torch.float32),
                                         dtype=torch.float32)
    for index, (kind, options, _) in enumerate(VARIANTS):
        losses = {mb: v for r in results for mb, v in r[index]["losses"].items()}
        assert sorted(losses) == [0, 1, 2, 3]
        for mb, value in losses.items():
            assert torch.equal(torch.from_numpy(value), ref_losses[0][mb]), (kind, options, mb)
        for r in results:
            for name, value in r[index]["grads"].items():
                assert torch.allclose(torch.from_numpy(value), ref_grads[name], rtol=1e-5, atol=1e-7), (kind, name)
    # zbv's I actions park (x, dy) of every Linear until W; without the split nothing is parked.
    assert all(r[0]["held"] > 0 for r in results) and all(r[1]["held"] == 0 for r in results)
    for rank in (0, 1):
        trace = json.loads((tmp_path / f"trace_step0_rank{rank}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert {"dualmoe/F/s0/mb0", "dualmoe/optimizer_step"} <= names if rank == 0 else \
            {"dualmoe/F/s1/mb0", "dualmoe/SEND_B/s1/mb0"} <= names, sorted(n for n in names if "dualmoe" in str(n))
