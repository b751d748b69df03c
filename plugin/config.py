"""Our keys in a DeepSpeed JSON: the `"pipeline"` section's schedule switch and its options.

    {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8,
     "pipeline": {"schedule": "dualpipev", "timeout_s": 120, "split_backward": true, "static_shapes": "auto"}}

DeepSpeed copies every `"pipeline"` key into `engine._config.pipeline` without checking it, so our keys
live there beside DeepSpeed's own (`stages`, `partition`, `seed_layers`, `activation_checkpoint_interval`,
`pipe_partitioned`, `grad_partitioned`, `use_reentrant`), which pass through untouched. A top-level
`"dualpipe"` section with the same keys is accepted as an alias; giving a key in both with different values
is an error. Without a `schedule` key nothing here applies and DeepSpeed runs as it always does.

This module is plan layer: it reads plain dicts and imports neither torch.distributed nor deepspeed.
`parse_pipeline_config` checks the keys, `check_run` checks them against the rest of the JSON and the
process layout; both raise `ConfigError` naming the key, the value and what is valid, on every rank,
before any rank waits on another.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError, ScheduleError
from .log import warn_once

__all__ = [
    "DEEPSPEED_PIPELINE_KEYS",
    "PARTITION_METHODS",
    "PipelineConfig",
    "ScheduleKind",
    "TraceConfig",
    "check_run",
    "micro_batches_of",
    "parse_pipeline_config",
]

logger = logging.getLogger(__name__)

ScheduleKind = Literal["1f1b", "zb1p", "zbv", "dualpipe", "dualpipev"]

# DeepSpeed's own "pipeline" keys (runtime/config.py: get_pipeline_config and PipelineEngine.__init__).
DEEPSPEED_PIPELINE_KEYS = frozenset({"stages", "partition", "seed_layers", "activation_checkpoint_interval",
                                     "pipe_partitioned", "grad_partitioned", "use_reentrant"})
PARTITION_METHODS = ("parameters", "uniform", "type:<regex>")

_SECTION = "pipeline"
_UNION_TAG = re.compile(r"^(bool|int|float|str|literal\[.*\])$")
_ALIAS_SECTION = "dualpipe"


class TraceConfig(BaseModel):
    """Per-rank torch.profiler traces of chosen training steps (chrome JSON, pid = rank)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Record traces at all."""
    steps: tuple[int, ...] = Field(default=(3,))
    """Global step numbers (engine.global_steps before the step runs) to record."""
    output_dir: str = "dualmoe_traces"
    """Folder for `trace_step<step>_rank<rank>.json`."""

    @model_validator(mode="after")
    def _check_steps(self) -> TraceConfig:
        if any(step < 0 for step in self.steps):
            raise ValueError(f"steps={list(self.steps)} must all be >= 0")
        return self


class PipelineConfig(BaseModel):
    """The dualmoe keys of the `"pipeline"` (or `"dualpipe"`) section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: ScheduleKind | None = None
    """Which schedule runs the pipeline; None keeps DeepSpeed's own PipelineEngine."""
    timeout_s: float = Field(default=300.0, gt=0)
    """Seconds any rank waits on a peer (p2p, step-end agreement) before raising `CommTimeout`. The pipeline's
    process groups get 2 x this + 30 s as their backend timeout (the NCCL watchdog's), the last resort for waits
    the engine cannot see (a device stream waiting on a receive); see `dualmoe.groups`."""
    overlap: bool = True
    """Run a stage's `overlapped_forward_backward` hook for F&B pairs; False runs every pair serially."""
    split_backward: bool = True
    """Defer weight grads of I actions to their W action (zero-bubble); False computes them in I."""
    static_shapes: bool | Literal["auto"] = "auto"
    """Tensors crossing stages keep the shapes and dtypes of the first step: shapes travel in headers during
    that step only, later receives are posted at once with them, and a sender whose shapes change raises an
    error naming the message. False negotiates shapes per message (sequence lengths may change between
    micro-batches). "auto" (default): static unless the PipelineModule was built with `dynamic_shape=True`,
    DeepSpeed's own switch for the same choice."""
    recv_posting: Literal["ahead", "at_use", "at_use_overlap"] = "at_use"
    """When a receive's payload is posted. "at_use" (default): when the stage needs it, with every earlier
    receive from that peer (message order holds), and on NCCL behind the compute already queued, so the
    receive's kernel never spins on SMs beside the stage's GEMMs (cuBLAS's persistent GEMMs then run up to
    1.8x longer); NCCL buffers the message, so the data has usually arrived by then. "at_use_overlap": posted
    when the stage needs it but started at once, beside the queued compute (the default before 2026-11-28).
    "ahead": at its RECV action, so the transfer may overlap compute, spinning until its data comes.
    docs/BENCHMARKS.md has the measurements."""
    partition_method: str = "parameters"
    """How layers are cut into stages: 'parameters', 'uniform' or 'type:<regex>' (DeepSpeed's methods)."""
    trace: TraceConfig = Field(default_factory=TraceConfig)
    """Profiler traces of selected steps."""

    @model_validator(mode="after")
    def _check_partition(self) -> PipelineConfig:
        method = self.partition_method.lower()
        if method not in ("parameters", "uniform") and not (method.startswith("type:") and len(method) > 5):
            raise ValueError(f"partition_method={self.partition_method!r} is not one of {', '.join(PARTITION_METHODS)}")
        return self


def _format_validation_error(err: ValidationError, section: str) -> str:
    """One line per problem: the dotted key, the value given and what is valid."""
    lines: list[str] = []
    fields = ", ".join(sorted(PipelineConfig.model_fields))
    union_keys: dict[str, int] = {}  # a union field fails once per member: one line, the reasons joined
    for item in err.errors():
        key = ".".join(str(part) for part in (section, *item["loc"]) if not _UNION_TAG.match(str(part)))
        value = item.get("input")
        if key in union_keys:
            lines[union_keys[key]] += f", or {item['msg'].lower()}"
            continue
        if len(item["loc"]) > 1 and _UNION_TAG.match(str(item["loc"][-1])):
            union_keys[key] = len(lines)
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}={value!r}: unknown key; valid keys: {fields} "
                         f"(plus DeepSpeed's own: {', '.join(sorted(DEEPSPEED_PIPELINE_KEYS))})")
        elif item["type"] == "literal_error":
            lines.append(f"{key}={value!r} is not valid; {item['msg'].lower()}")
        else:
            lines.append(f"{key}={value!r}: {item['msg']}")
    return "; ".join(lines)


def _our_keys(ds_config: Mapping[str, Any], section: str) -> dict[str, Any]:
    raw = ds_config.get(section) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}={raw!r} must be a JSON object")
    if section == _SECTION:
        return {k: v for k, v in raw.items() if k not in DEEPSPEED_PIPELINE_KEYS}
    return dict(raw)


def parse_pipeline_config(ds_config: Mapping[str, Any], *, schedule: str | None = None) -> PipelineConfig | None:
    """Read and check our keys of a DeepSpeed config dict.

    Args:
        ds_config: the DeepSpeed JSON as a dict.
        schedule: a command-line override of `pipeline.schedule` (e.g. `--pipeline-schedule`), or None.

    Returns:
        The typed settings, or None when no schedule is chosen (plain DeepSpeed behaviour).

    Raises:
        ConfigError: an unknown key, a bad value, or `pipeline` and `dualpipe` disagreeing on a key.
    """
    ours = _our_keys(ds_config, _SECTION)
    alias = _our_keys(ds_config, _ALIAS_SECTION)
    for key in sorted(set(ours) & set(alias)):
        if ours[key] != alias[key]:
            raise ConfigError(f"{_SECTION}.{key}={ours[key]!r} and {_ALIAS_SECTION}.{key}={alias[key]!r} disagree; "
                              f"set the key in one section only")
    merged = {**alias, **ours}
    if schedule is not None:
        merged["schedule"] = schedule
    section = _SECTION if ours or not alias else _ALIAS_SECTION
    try:
        cfg = PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, section)) from None
    if cfg.schedule is None:
        if merged:
            warn_once(logger, f"{section} keys {sorted(merged)} have no effect without {section}.schedule")
        return None
    return cfg


def micro_batches_of(ds_config: Mapping[str, Any], *, dp_size: int) -> int:
    """Gradient accumulation steps (= micro-batches per step) as DeepSpeed derives them.

    Args:
        ds_config: the DeepSpeed JSON as a dict.
        dp_size: data-parallel world size.

    Returns:
        `gradient_accumulation_steps`, or `train_batch_size // (train_micro_batch_size_per_gpu * dp_size)`.

    Raises:
        ConfigError: the batch keys are missing or not positive integers.
    """
    gas = ds_config.get("gradient_accumulation_steps")
    if gas is None:
        tbs, mbs = ds_config.get("train_batch_size"), ds_config.get("train_micro_batch_size_per_gpu")
        if isinstance(tbs, int) and isinstance(mbs, int) and mbs > 0:
            gas = tbs // (mbs * dp_size)
        elif isinstance(tbs, int) and mbs is None:
            gas = 1
        else:
            raise ConfigError(f"gradient_accumulation_steps is unset and train_batch_size={tbs!r}, "
                              f"train_micro_batch_size_per_gpu={mbs!r} do not determine it; set integers "
                              f"(\"auto\" is not resolved for pipeline schedules)")
    if not isinstance(gas, int) or isinstance(gas, bool) or gas < 1:
        raise ConfigError(f"gradient_accumulation_steps={gas!r} must be an integer >= 1")
    return gas


def _zero_stage(ds_config: Mapping[str, Any]) -> int:
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else 0


def check_run(cfg: PipelineConfig, ds_config: Mapping[str, Any], *, pipe_ranks: int, dp_size: int) -> int:
    """Check the chosen schedule against the rest of the DeepSpeed JSON and the process layout.

    Args:
        cfg: our parsed settings (with a schedule).
        ds_config: the DeepSpeed JSON as a dict.
        pipe_ranks: number of pipeline ranks P.
        dp_size: data-parallel world size.

    Returns:
        The number of micro-batches per step.

    Raises:
        ConfigError: ZeRO-2/3, too few or odd micro-batches, odd P for DualPipe,
            or any other (P, m) the schedule generator rejects.
    """
    from .schedule import generate

    kind = cfg.schedule
    where = f'pipeline.schedule "{kind}"'
    stage = _zero_stage(ds_config)
    if stage >= 2:
        raise ConfigError(f"zero_optimization.stage={stage}: {where} needs ZeRO stage 0 or 1 (pipeline parallelism "
                          f"accumulates grads over micro-batches, which ZeRO-2/3 partition); set 0 or 1")
    m = micro_batches_of(ds_config, dp_size=dp_size)
    if kind == "dualpipe" and pipe_ranks % 2:
        raise ConfigError(f"pipe ranks={pipe_ranks}: {where} needs an even number of pipeline ranks; "
                          f"use {pipe_ranks + 1} or {pipe_ranks - 1} ranks, or schedule \"dualpipev\"")
    if kind in ("dualpipe", "dualpipev") and m < 2 * pipe_ranks:
        raise ConfigError(f"gradient_accumulation_steps={m}: {where} needs >= 2 x pipe ranks ({2 * pipe_ranks}); "
                          f"set {2 * pipe_ranks} or more")
    if kind == "dualpipe" and m % 2:
        raise ConfigError(f"gradient_accumulation_steps={m}: {where} needs an even number of micro-batches "
                          f"(half enter at each end); set {m + 1}")
    try:
        generate(kind, pipe_ranks, m)
    except ScheduleError as err:
        raise ConfigError(f"gradient_accumulation_steps={m}, pipe ranks={pipe_ranks}: {where} rejects this "
                          f"layout: {err}") from None
    return m
