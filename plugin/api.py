"""Public entry points: `initialize` (a drop-in `deepspeed.initialize`), `install`/`uninstall`, `add_arguments`.

    engine, optimizer, _, scheduler = dualmoe.initialize(model=pipeline_module, config="ds.json",
                                                         model_parameters=pipeline_module.parameters())
    loss = engine.train_batch(data_iter)

With `"pipeline": {"schedule": "dualpipev"}` (or "1f1b", "zb1p", "zbv", "dualpipe") in the DeepSpeed JSON and
a stock `deepspeed.pipe.PipelineModule`, `initialize` re-cuts the module for the schedule (`dualmoe.stage`)
and returns a `DualPipeEngine`; without a schedule key it *is* `deepspeed.initialize`. A model (or, in a
pipeline, this rank's stages) holding `dualmoe.moe` MoE layers gets the MoE-aware subclass of the engine
(`dualmoe.moe.hooks.moe_engine_class`: replica grads, load statistics, router bias, EPLB, MoE checkpoints);
models without MoE layers get DeepSpeed's class unchanged. `install()` wraps
`deepspeed.initialize` so unmodified scripts, and accelerate (which looks the function up at call time),
get the same behaviour from the JSON alone; `uninstall()` puts the original back.

Parameters and optimizers. The stock module was built for DeepSpeed's P-stage cut, so its parameters are
not the ones this rank trains. `model_parameters` given as that module's parameters (or None) becomes
the new module's trainable parameters; param groups (dicts) are mapped by parameter name without its
layer index ("3.bias" -> "bias"), and a callable `fn(module)` is called on the new module. An optimizer
*instance* over the old parameters is rebuilt with the same class and hyper-parameters (an LR scheduler
instance over it is re-pointed); optimizer callables and the JSON "optimizer" section work unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

from .config import PipelineConfig, check_run, parse_pipeline_config
from .engine import DualPipeEngine, EnginePlan
from .errors import ConfigError
from .failure import default_store
from .groups import build_groups
from .log import log_rank0
from .schedule import SCHEDULE_KINDS, generate
from .stage import PipelineStages, plan_layout

__all__ = ["add_arguments", "initialize", "install", "prepare", "uninstall"]

logger = logging.getLogger(__name__)

_ORIGINAL = "__dualmoe_original__"


def _original_initialize() -> Callable[..., Any]:
    fn = deepspeed.initialize
    return getattr(fn, _ORIGINAL, fn)


def _config_dict(args: Any, config: Any, config_params: Any) -> dict[str, Any] | None:
    """The DeepSpeed JSON as a dict, found the way `deepspeed.initialize` finds it (None if absent)."""
    config = config if config is not None else config_params
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
    if config is None:
        return None
    return dict(config) if isinstance(config, Mapping) else load_ds_config(config)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add dualmoe's command-line flags; their values override the JSON when `args` reaches `initialize`.

    Args:
        parser: the script's parser.

    Returns:
        The same parser, with `--pipeline-schedule` added.
    """
    group = parser.add_argument_group("dualmoe")
    group.add_argument("--pipeline-schedule", dest="pipeline_schedule", choices=SCHEDULE_KINDS, default=None,
                       help="pipeline schedule (overrides pipeline.schedule in the DeepSpeed JSON)")
    return parser


def _name_key(name: str) -> str:
    """A parameter name without its layer index: "3.mlp.bias" -> "mlp.bias"."""
    head, _, rest = name.partition(".")
    return rest if head.isdigit() else name


def _map_groups(groups: list[dict[str, Any]], old_names: Mapping[int, str], new: PipelineStages) -> list[dict]:
    """Param groups over the old module's parameters -> the same groups over the new module's."""
    key_to_group: dict[str, int] = {}
    for index, group in enumerate(groups):
        for p in group["params"]:
            if id(p) not in old_names:
                raise ConfigError("model_parameters mixes parameters of other modules with the PipelineModule's; "
                                  "pass a callable fn(module) -> params or param groups instead")
            key_to_group.setdefault(_name_key(old_names[id(p)]), index)
    mapped = [{**group, "params": []} for group in groups]
    for name, p in new.named_parameters():
        if not p.requires_grad:
            continue
        index = key_to_group.get(_name_key(name))
        if index is None:
            raise ConfigError(f"cannot place parameter {name!r} of the re-cut pipeline into a param group "
                              f"(groups hold {sorted(key_to_group)}); pass model_parameters as a callable "
                              f"fn(module) -> param groups")
        mapped[index]["params"].append(p)
    return mapped


def _remap_parameters(model_parameters: Any, old_names: Mapping[int, str], new: PipelineStages) -> Any:
    if model_parameters is None:
        return None
    if callable(model_parameters):
        return model_parameters(new)
    items = list(model_parameters)
    if items and all(isinstance(g, Mapping) for g in items):
        return _map_groups([dict(g) for g in items], old_names, new)
    if all(isinstance(p, torch.Tensor) and id(p) in old_names for p in items):
        return [p for p in new.parameters() if p.requires_grad]
    raise ConfigError("model_parameters must be the PipelineModule's parameters, its param groups, or a "
                      "callable fn(module); other tensors cannot be mapped onto the re-cut stages")


def _remap_optimizer(optimizer: Any, lr_scheduler: Any, old_names: Mapping[int, str],
                     new: PipelineStages) -> tuple[Any, Any]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer, lr_scheduler
    groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
    rebuilt = type(optimizer)(_map_groups(groups, old_names, new), **optimizer.defaults)
    if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is optimizer:
        lr_scheduler.optimizer = rebuilt
    return rebuilt, lr_scheduler


def _with_moe(base: type, module: torch.nn.Module) -> type:
    """`base`, or its MoE-aware subclass when `module` holds dualmoe MoE layers."""
    from .moe.hooks import moe_engine_class, moe_layers

    return moe_engine_class(base) if moe_layers(module) else base


@contextlib.contextmanager
def _moe_engines_bound(model: Any) -> Iterator[None]:
    """Let `deepspeed.initialize` build MoE-aware engines for a model with MoE layers (it looks the engine
    classes up in its module globals at call time); nothing changes for other models."""
    names = ("DeepSpeedEngine", "PipelineEngine")
    if not isinstance(model, torch.nn.Module) or _with_moe(deepspeed.DeepSpeedEngine, model) is \
            deepspeed.DeepSpeedEngine:
        yield
        return
    saved = {name: getattr(deepspeed, name) for name in names}
    for name in names:
        setattr(deepspeed, name, _with_moe(saved[name], model))
    try:
        yield
    finally:
        for name, cls in saved.items():
            setattr(deepspeed, name, cls)


def _engine_id() -> str:
    """A key prefix every rank computes alike: the count of engines this rank built, kept in the store."""
    store = default_store()
    if store is None:
        return "0"
    return str(store.add(f"dualmoe/engines/rank{torch.distributed.get_rank()}", 1))


def _build(cfg: PipelineConfig, config: dict[str, Any], model: PipelineModule, kwargs: dict[str, Any]) -> tuple:
    grid = model.mpu()
    m = check_run(cfg, config, pipe_ranks=grid.pipe_parallel_size, dp_size=grid.data_parallel_size)
    schedule = generate(cfg.schedule, grid.pipe_parallel_size, m)
    layout = plan_layout(model._layer_specs, schedule, cfg.partition_method)
    groups = build_groups(grid, shared_pp_ranks=layout.shared_rank_sets(), timeout_s=cfg.timeout_s)
    old_names = {id(p): name for name, p in model.named_parameters()}
    stages = PipelineStages(model, layout=layout, pp_rank=groups.pp_rank,
                            shared_groups=[(r, g, groups.to_global(r[0])) for r, g in groups.shared])
    params = _remap_parameters(kwargs.pop("model_parameters"), old_names, stages)
    optimizer, scheduler = _remap_optimizer(kwargs.pop("optimizer"), kwargs.pop("lr_scheduler"), old_names, stages)
    plan = EnginePlan(config=cfg, layout=layout, groups=groups, engine_id=_engine_id())
    log_rank0(logger, "dualmoe: schedule %s, P=%d, m=%d, layer bounds %s", cfg.schedule, grid.pipe_parallel_size, m,
              layout.bounds)
    deepspeed.zero.partition_parameters.shutdown_init_context()
    config_class = DeepSpeedConfig(config, grid)
    deepspeed.set_optimizer_flags(config_class, stages)
    engine_class = _with_moe(DualPipeEngine, stages)
    engine = engine_class(model=stages, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler,
                          mpu=grid, config=config, config_class=config_class, plan=plan, **kwargs)
    deepspeed.zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def initialize(args: Any = None, model: torch.nn.Module | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | Callable[[torch.nn.Module], Any] | None = None,
               training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int = deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT, mpu: Any = None,
               dist_init_required: bool | None = None, collate_fn: Callable | None = None, config: Any = None,
               mesh_param: Any = None, config_params: Any = None) -> tuple[Any, Any, Any, Any]:
    """`deepspeed.initialize` that runs `pipeline.schedule` when the JSON names one.

    Same arguments and the same `(engine, optimizer, training_dataloader, lr_scheduler)` result as
    `deepspeed.initialize`; `args.pipeline_schedule` (see `add_arguments`) overrides the JSON.

    Returns:
        `(engine, optimizer, training_dataloader, lr_scheduler)`; `engine` is a `DualPipeEngine` when a
        schedule is set, else whatever `deepspeed.initialize` returns.

    Raises:
        ConfigError: bad dualmoe keys, or a layout the schedule cannot run (raised on every rank before
            any rank waits on another).
    """
    original = _original_initialize()
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                  mesh_param=mesh_param, config_params=config_params)
    ds_config = _config_dict(args, config, config_params)
    cfg = None if ds_config is None else parse_pipeline_config(ds_config,
                                                               schedule=getattr(args, "pipeline_schedule", None))
    if cfg is None:
        with _moe_engines_bound(model):
            return original(**kwargs)
    if not isinstance(model, PipelineModule):
        raise ConfigError(f"pipeline.schedule={cfg.schedule!r} needs a deepspeed.pipe.PipelineModule model, "
                          f"got {type(model).__name__}; build the model from LayerSpecs or drop the key")
    if mpu is not None or mesh_param is not None:
        raise ConfigError("mpu and mesh_param must be None with pipeline parallelism (the PipelineModule's "
                          "topology defines the groups)")
    if getattr(args, "deepspeed_config", None) is not None and config is not None:
        raise ConfigError("give the DeepSpeed config either as args.deepspeed_config or as config=, not both")
    deepspeed.comm.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                                    distributed_port=distributed_port, dist_init_required=dist_init_required)
    rest = {k: kwargs[k] for k in ("args", "training_data", "dist_init_required", "collate_fn")}
    rest.update(model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler)
    return _build(cfg, ds_config, model, rest)


prepare = initialize


def install() -> None:
    """Route `deepspeed.initialize` through `dualmoe.initialize` (idempotent, undone by `uninstall`)."""
    if hasattr(deepspeed.initialize, _ORIGINAL):
        return
    original = deepspeed.initialize

    def initialize_with_schedules(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        return initialize(*args, **kwargs)

    setattr(initialize_with_schedules, _ORIGINAL, original)
    initialize_with_schedules.__doc__ = original.__doc__
    deepspeed.initialize = initialize_with_schedules


def uninstall() -> None:
    """Put the original `deepspeed.initialize` back (no-op if `install` was not called)."""
    original = getattr(deepspeed.initialize, _ORIGINAL, None)
    if original is not None:
        deepspeed.initialize = original
