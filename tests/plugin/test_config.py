"""Our "pipeline" keys: parsing, the "dualpipe" alias, and every impossible combination named clearly."""

from __future__ import annotations

import pytest
from dualmoe.config import PipelineConfig, check_run, micro_batches_of, parse_pipeline_config
from dualmoe.errors import ConfigError


def _ds(**pipeline: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "pipeline": dict(pipeline)}


def test_config_without_schedule_is_plain_deepspeed() -> None:
    assert parse_pipeline_config({"train_batch_size": 8}) is None
    assert parse_pipeline_config(_ds(activation_checkpoint_interval=0, pipe_partitioned=False)) is None


def test_config_parses_schedule_and_keeps_deepspeed_keys_apart() -> None:
    cfg = parse_pipeline_config(_ds(schedule="dualpipev", timeout_s=12, seed_layers=True, partition="best"))
    assert cfg == PipelineConfig(schedule="dualpipev", timeout_s=12.0)
    assert cfg.split_backward and cfg.overlap and cfg.partition_method == "parameters"
    assert cfg.static_shapes == "auto"  # static unless the PipelineModule says dynamic_shape=True
    assert parse_pipeline_config(_ds(schedule="zbv", static_shapes=False)).static_shapes is False


def test_config_accepts_the_dualpipe_section_as_alias() -> None:
    cfg = parse_pipeline_config({"dualpipe": {"schedule": "dualpipe", "overlap": False}})
    assert cfg is not None and cfg.schedule == "dualpipe" and not cfg.overlap
    same = parse_pipeline_config({"pipeline": {"schedule": "zbv"}, "dualpipe": {"schedule": "zbv"}})
    assert same is not None and same.schedule == "zbv"


def test_config_rejects_sections_that_disagree() -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.schedule='zbv' and dualpipe\.schedule='dualpipe' disagree"):
        parse_pipeline_config({"pipeline": {"schedule": "zbv"}, "dualpipe": {"schedule": "dualpipe"}})


def test_config_command_line_override_wins() -> None:
    cfg = parse_pipeline_config(_ds(schedule="1f1b"), schedule="zb1p")
    assert cfg is not None and cfg.schedule == "zb1p"
    assert parse_pipeline_config({}, schedule="dualpipev") == PipelineConfig(schedule="dualpipev")


@pytest.mark.parametrize(("pipeline", "pattern"), [
    ({"schedule": "dualpipe2"}, r"pipeline\.schedule='dualpipe2' is not valid; .*'dualpipev'"),
    ({"schedule": "zbv", "timout_s": 3}, r"pipeline\.timout_s=3: unknown key; valid keys: .*timeout_s"),
    ({"schedule": "zbv", "timeout_s": 0}, r"pipeline\.timeout_s=0: .*greater than 0"),
    ({"schedule": "zbv", "partition_method": "profile"}, r"partition_method='profile' is not one of parameters"),
    ({"schedule": "zbv", "trace": {"enabled": True, "step": 3}}, r"pipeline\.trace\.step=3: unknown key"),
    ({"schedule": "zbv", "overlap": "sometimes"}, r"pipeline\.overlap='sometimes'"),
    ({"schedule": "zbv", "static_shapes": "never"},
     r"^pipeline\.static_shapes='never': Input should be a valid boolean, .*, or input should be 'auto'$"),
    ({"schedule": "zbv", "recv_posting": "early"}, r"pipeline\.recv_posting='early' is not valid; .*'at_use'"),
])
def test_config_rejects_bad_keys_naming_key_value_and_valid(pipeline: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_pipeline_config(_ds(**pipeline))


def test_config_is_frozen() -> None:
    cfg = PipelineConfig(schedule="zbv")
    with pytest.raises(ValueError, match="frozen"):
        cfg.timeout_s = 3.0  # type: ignore[misc]


def test_config_micro_batches_follow_deepspeed_arithmetic() -> None:
    assert micro_batches_of({"gradient_accumulation_steps": 6}, dp_size=4) == 6
    assert micro_batches_of({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2}, dp_size=2) == 8
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=0 must be an integer >= 1"):
        micro_batches_of({"gradient_accumulation_steps": 0}, dp_size=1)
    with pytest.raises(ConfigError, match=r"\"auto\" is not resolved"):
        micro_batches_of({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, dp_size=1)


@pytest.mark.parametrize(("schedule", "ds", "pipe", "pattern"), [
    ("dualpipev", {"gradient_accumulation_steps": 6}, 4,
     r"gradient_accumulation_steps=6: pipeline\.schedule \"dualpipev\" needs >= 2 x pipe ranks \(8\); set 8 or more"),
    ("dualpipe", {"gradient_accumulation_steps": 4}, 4, r"gradient_accumulation_steps=4: .*\"dualpipe\" needs >= 2"),
    ("dualpipe", {"gradient_accumulation_steps": 9}, 4, r"gradient_accumulation_steps=9: .*even number of micro"),
    ("dualpipe", {"gradient_accumulation_steps": 12}, 3, r"pipe ranks=3: .*\"dualpipe\" needs an even number"),
    ("1f1b", {"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 2}}, 2,
     r"zero_optimization\.stage=2: .*needs ZeRO stage 0 or 1"),
    ("zbv", {"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 3}}, 2, r"zero_optimization\.stage=3"),
])
def test_config_check_run_rejects_impossible_layouts(schedule: str, ds: dict, pipe: int, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        check_run(PipelineConfig(schedule=schedule), ds, pipe_ranks=pipe, dp_size=1)


def test_config_check_run_returns_micro_batches() -> None:
    assert check_run(PipelineConfig(schedule="dualpipe"), {"gradient_accumulation_steps": 8}, pipe_ranks=4,
                     dp_size=1) == 8
    assert check_run(PipelineConfig(schedule="1f1b"), {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 1},
                     pipe_ranks=2, dp_size=2) == 8


@pytest.mark.parametrize("name", ["pipeline_dualpipev", "pipeline_dualpipe", "pipeline_zbv_traced",
                                  "pipeline_1f1b_cpu"])
def test_config_example_files_parse_and_fit_their_layout(name: str) -> None:
    import json
    from pathlib import Path

    ds = json.loads((Path(__file__).parents[2] / "configs" / f"{name}.json").read_text())
    cfg = parse_pipeline_config(ds)
    assert cfg is not None
    assert check_run(cfg, ds, pipe_ranks=4 if cfg.schedule != "1f1b" else 2, dp_size=1) == \
        ds["gradient_accumulation_steps"]
