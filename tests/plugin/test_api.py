"""dualmoe.initialize / install / add_arguments: a drop-in deepspeed.initialize driven by the JSON."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import deepspeed
import dualmoe
import pytest
import torch
from dualmoe.api import add_arguments, install, uninstall

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, batches, loss_fn, mlp_specs


def test_api_install_wraps_deepspeed_initialize_reversibly() -> None:
    original = deepspeed.initialize
    try:
        install()
        wrapped = deepspeed.initialize
        assert wrapped is not original and wrapped.__dualmoe_original__ is original
        install()  # idempotent: no wrapper around the wrapper
        assert deepspeed.initialize is wrapped
    finally:
        uninstall()
    assert deepspeed.initialize is original
    uninstall()  # no-op when not installed
    assert deepspeed.initialize is original


def test_api_add_arguments_adds_the_schedule_override() -> None:
    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--pipeline-schedule", "zbv"]).pipeline_schedule == "zbv"
    assert parser.parse_args([]).pipeline_schedule is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--pipeline-schedule", "gpipe"])


def _model() -> Any:
    from deepspeed.pipe import PipelineModule

    return PipelineModule(mlp_specs(4), num_stages=2, loss_fn=loss_fn, seed_layers=True, base_seed=BASE_SEED,
                          partition_method="uniform")


def _config(**pipeline: Any) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "steps_per_print": 10**6,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "pipeline": pipeline}


def _entry_points(rank: int, world_size: int, json_path: str) -> dict[str, Any]:
    deepspeed.init_distributed(dist_backend="gloo")
    out: dict[str, Any] = {}
    install()
    try:
        # An unmodified script: deepspeed.initialize picks the engine from the JSON alone.
        engine, *_ = deepspeed.initialize(model=_model(), config=_config(schedule="zbv"))
        out["installed"] = (type(engine).__name__, engine._plan.config.schedule)
        engine, *_ = deepspeed.initialize(model=_model(), config=_config())
        out["no_schedule"] = type(engine).__name__
    finally:
        uninstall()
    # args.deepspeed_config plus the command-line override.
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--pipeline-schedule", "dualpipev"])
    args.deepspeed_config, args.local_rank = json_path, rank
    model = _model()
    engine, *_ = dualmoe.initialize(args=args, model=model, model_parameters=model.parameters())
    out["override"] = engine._plan.config.schedule
    # An optimizer instance and an LR scheduler over the stock module's parameters are moved to the new ones.
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    engine, *_ = dualmoe.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                    config=_config(schedule="dualpipe"))
    names = {id(p): n for n, p in engine.module.named_parameters()}
    params = [p for g in engine.basic_optimizer.param_groups for p in g["params"]]
    out["optimizer"] = (type(engine.basic_optimizer).__name__, sorted(names[id(p)] for p in params),
                        sorted(names.values()), engine.basic_optimizer.defaults["momentum"])
    engine.train_batch(iter(batches("mlp", 4, seed=1, dtype=torch.float32)))
    out["lr_after_step"] = engine.get_lr()
    # Param groups are mapped by name without the layer index.
    model = _model()
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.1}]
    engine, *_ = dualmoe.initialize(model=model, model_parameters=groups, config=_config(schedule="dualpipev"))
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out["groups"] = [(g["weight_decay"], sorted(names[id(p)].split(".")[-1] for p in g["params"]))
                     for g in engine.basic_optimizer.param_groups]
    # A loader set on the engine (what training_data= leads to) stays on the ranks that read data.
    model = _model()
    engine, *_ = dualmoe.initialize(model=model, model_parameters=model.parameters(),
                                    config=_config(schedule="dualpipev"))
    engine.set_dataloader(batches("mlp", 4, seed=1, dtype=torch.float32))
    out["loader"] = (engine.training_dataloader is not None, engine.data_iterator is not None,
                     float(engine.train_batch()))
    return out


@pytest.mark.dist
def test_api_entry_points_pick_the_engine_from_config_args_and_install(tmp_path: Any) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(schedule="1f1b")))
    results = run_ranks(_entry_points, 2, args=(str(path),), timeout_s=240)
    for rank, out in enumerate(results):
        assert out["installed"] == ("DualPipeEngine", "zbv")
        assert out["no_schedule"] == "PipelineEngine"
        assert out["override"] == "dualpipev"
        kind, used, held, momentum = out["optimizer"]
        assert kind == "SGD" and used == held and momentum == 0.5, rank
        assert out["lr_after_step"] == [0.025]
        assert [wd for wd, _ in out["groups"]] == [0.0, 0.1]
        assert set(out["groups"][0][1]) == {"bias"} and set(out["groups"][1][1]) == {"weight"}
    # dualpipev reads data on pp rank 0 only; the loss reaches every rank.
    assert results[0]["loader"][:2] == (True, True) and results[1]["loader"][:2] == (False, False)
    assert results[0]["loader"][2] == results[1]["loader"][2] > 0


def _bad_config_on_rank_zero_only(rank: int, world_size: int) -> str:
    deepspeed.init_distributed(dist_backend="gloo")
    model = _model()
    if rank == 1:
        time.sleep(1)
        return "did not call initialize"
    try:  # rank 1 never joins: a check that waited on it would hang here
        dualmoe.initialize(model=model, model_parameters=model.parameters(),
                           config={**_config(schedule="dualpipev"), "gradient_accumulation_steps": 2})
    except dualmoe.errors.ConfigError as err:
        return str(err)
    return "no error"


@pytest.mark.dist
def test_api_bad_config_raises_before_waiting_on_other_ranks() -> None:
    message = run_ranks(_bad_config_on_rank_zero_only, 2, timeout_s=60)[0]
    assert message == ('gradient_accumulation_steps=2: pipeline.schedule "dualpipev" needs >= 2 x pipe ranks (4); '
                       'set 4 or more')


def test_api_schedule_needs_a_pipeline_module() -> None:
    with pytest.raises(dualmoe.errors.ConfigError, match=r"needs a deepspeed.pipe.PipelineModule model, got Linear"):
        dualmoe.initialize(model=torch.nn.Linear(2, 2), config=_config(schedule="zbv"))
