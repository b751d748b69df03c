"""Cut a stock `deepspeed.pipe.PipelineModule`'s layer list into a schedule's stages and build this rank's.

A `PipelineModule(layers, num_stages=P, ...)` already holds the whole model as a list of `LayerSpec`s,
`TiedLayerSpec`s, modules and callables. A schedule needs another cut:

    schedule              parts   rank r builds
    1f1b, zb1p            P       part r
    zbv, dualpipev        2P      parts r and 2P-1-r (V placement: stage 0 and stage 2P-1 on rank 0)
    dualpipe              P       part r of copy 0 (stage r) and part P-1-r of copy 1 (stage 2P-1-r)

The parts come from DeepSpeed's own partitioners ('parameters', 'uniform', 'type:<regex>'), so a P-stage
cut equals DeepSpeed's. Layers keep their global index as module name ("3.weight", "tied_modules.embed.
weight"), exactly as in `PipelineModule`, so per-layer checkpoint files (`layer_03-model_states.pt`) are
interchangeable with DeepSpeed's and a reference model can copy weights by layer index.

Copies of one parameter on several pipeline ranks (DualPipe's two copies of every part; a tied layer
used by parts on different ranks) start equal (broadcast from the lowest rank) and stay equal because
their grads are summed over the owning ranks before the optimizer step (`PipelineStages.shared_grads`);
every copy but the *owner's* is flagged `ds_pipe_replicated` so DeepSpeed counts it once in grad norms.
A part's owner is the rank of its first stage (copy 0 for DualPipe, so each rank of a mirrored pair owns
one of its two parts; DeepSpeed's BF16_Optimizer fails on a rank that owns nothing); a tied module's owner
is the owner of its first layer. Tied layers whose parts sit on one rank (V placement's embedding and head)
share one module.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.state_dict_factory import SDLoaderFactory
from torch import nn

from .errors import ConfigError
from .schedule.ir import Schedule

__all__ = ["PipelineStages", "Stage", "StageLayout", "count_layer_params", "partition_layers", "plan_layout"]

logger = logging.getLogger(__name__)


def count_layer_params(specs: Sequence[Any]) -> list[int]:
    """Trainable parameter count of every layer, building specs on the meta device (no memory, no RNG)."""
    counts = []
    for layer in specs:
        if isinstance(layer, LayerSpec):
            try:
                with torch.device("meta"):
                    built = layer.build()
            except Exception:  # a layer that cannot be built on meta (e.g. it loads data): build it for real
                built = layer.build()
            counts.append(sum(p.numel() for p in built.parameters() if p.requires_grad))
        elif isinstance(layer, nn.Module):
            counts.append(sum(p.numel() for p in layer.parameters() if p.requires_grad))
        else:
            counts.append(0)
    return counts


def _layer_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", "")


def partition_layers(specs: Sequence[Any], num_parts: int, method: str) -> tuple[int, ...]:
    """Layer bounds of `num_parts` contiguous parts, as DeepSpeed's `PipelineModule._partition_layers` cuts.

    Args:
        specs: the PipelineModule's layer list.
        num_parts: number of parts.
        method: 'parameters', 'uniform' or 'type:<regex>'.

    Returns:
        `num_parts + 1` bounds; part k holds layers `[bounds[k], bounds[k+1])`.

    Raises:
        ConfigError: an unknown method, a regex matching no layer, or fewer layers than parts.
    """
    if len(specs) < num_parts:
        raise ConfigError(f"the model has {len(specs)} layers, fewer than the {num_parts} stages the schedule "
                          f"needs; add layers or use fewer pipeline ranks")
    name = method.lower()
    if name == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(specs), num_parts=num_parts)
    elif name == "parameters":
        parts = ds_utils.partition_balanced(weights=count_layer_params(specs), num_parts=num_parts)
    elif name.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(_layer_name(layer)) else 0 for layer in specs]
        if not any(weights):
            raise ConfigError(f"pipeline.partition_method={method!r} matches no layer; layer types are "
                              f"{sorted({_layer_name(layer) for layer in specs})}")
        parts = ds_utils.partition_balanced(weights=weights, num_parts=num_parts)
    else:
        raise ConfigError(f"pipeline.partition_method={method!r} is not 'parameters', 'uniform' or 'type:<regex>'")
    return tuple(int(b) for b in parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class StageLayout:
    """Which layers form each model part, and where a schedule places each stage.

    Args:
        bounds: part k holds layers `[bounds[k], bounds[k+1])`.
        stage_to_rank: pipeline rank of each schedule stage.
        stage_to_part: model part computed by each schedule stage.
        tied: (key, layer indices) for every `TiedLayerSpec` key, sorted by key.
    """

    bounds: tuple[int, ...]
    stage_to_rank: tuple[int, ...]
    stage_to_part: tuple[int, ...]
    tied: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def num_parts(self) -> int:
        """Number of distinct model parts."""
        return len(self.bounds) - 1

    def part_of_layer(self, layer_index: int) -> int:
        """The part holding layer `layer_index`."""
        return next(k for k in range(self.num_parts) if self.bounds[k] <= layer_index < self.bounds[k + 1])

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        """Schedule stages placed on `pp_rank`."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == pp_rank)

    def parts_of(self, pp_rank: int) -> tuple[int, ...]:
        """Model parts built on `pp_rank`, ascending."""
        return tuple(sorted({self.stage_to_part[s] for s in self.stages_of(pp_rank)}))

    def part_owners(self, part: int) -> tuple[int, ...]:
        """Pipeline ranks holding a copy of `part`."""
        return tuple(sorted({r for s, r in enumerate(self.stage_to_rank) if self.stage_to_part[s] == part}))

    def part_owner(self, part: int) -> int:
        """The rank whose copy of `part` counts in grad norms and writes checkpoints: its first stage's."""
        return self.stage_to_rank[self.stage_to_part.index(part)]

    def tied_owner(self, key: str) -> int:
        """The rank whose copy of tied module `key` counts: the owner of the key's first layer."""
        return self.part_owner(self.part_of_layer(dict(self.tied)[key][0]))

    def tied_owners(self, key: str) -> tuple[int, ...]:
        """Pipeline ranks holding the tied module `key`."""
        layers = dict(self.tied)[key]
        return tuple(sorted({r for i in layers for r in self.part_owners(self.part_of_layer(i))}))

    def shared_rank_sets(self) -> tuple[tuple[int, ...], ...]:
        """Every set of two or more pipeline ranks that hold copies of the same parameters."""
        sets = {self.part_owners(k) for k in range(self.num_parts)} | {self.tied_owners(k) for k, _ in self.tied}
        return tuple(sorted(s for s in sets if len(s) > 1))


def plan_layout(specs: Sequence[Any], schedule: Schedule, method: str) -> StageLayout:
    """Cut `specs` into the schedule's model parts and place them.

    Args:
        specs: the PipelineModule's layer list.
        schedule: the schedule to run (its `stage_to_rank`, `model_part`, `stages_per_copy`).
        method: partition method (see `partition_layers`).

    Returns:
        The layout every rank computes identically.
    """
    bounds = partition_layers(specs, schedule.stages_per_copy, method)
    tied: dict[str, list[int]] = {}
    for index, layer in enumerate(specs):
        if isinstance(layer, TiedLayerSpec):
            tied.setdefault(layer.key, []).append(index)
    return StageLayout(bounds=bounds, stage_to_rank=tuple(schedule.stage_to_rank),
                       stage_to_part=tuple(schedule.model_part(s) for s in range(schedule.num_stages)),
                       tied=tuple((k, tuple(v)) for k, v in sorted(tied.items())))


class Stage(nn.Module):
    """One model part as a callable: runs its layers in order on a tensor or a tuple of tensors.

    With activation checkpointing on (`activation_checkpoint_interval` > 0 on the owning `PipelineStages`,
    from the PipelineModule or the DeepSpeed JSON, read at every call) the part runs in chunks of that
    many layers, as DeepSpeed's `PipelineModule.forward` does within a stage: a chunk that DeepSpeed's
    `_is_checkpointable` accepts goes through the owner's `activation_checkpoint_func` (DeepSpeed's reentrant
    `checkpoint`, or `non_reentrant_checkpoint` with `"pipeline": {"use_reentrant": false}`), so its
    activations are recomputed in backward instead of kept.

    Args:
        part: the model part's index.
        layers: (global layer index, forward function) in order.
        owner: where the checkpointing settings live (None: never checkpoint).
    """

    def __init__(self, part: int, layers: Sequence[tuple[int, Callable[[Any], Any]]],
                 owner: PipelineStages | None = None) -> None:
        super().__init__()
        self.part = part
        self.layer_indices = tuple(i for i, _ in layers)
        self._funcs = [fn for _, fn in layers]
        for index, fn in layers:
            if isinstance(fn, nn.Module):
                self.add_module(str(index), fn)
        # a weak reference: the owner holds this stage, and a module attribute would register it as a child
        self._owner = weakref.ref(owner) if owner is not None else None

    def forward(self, *inputs: Any) -> Any:
        """Run the part's layers on `inputs`: one tensor goes in as is, several as one tuple (DeepSpeed's way)."""
        owner = self._owner() if self._owner is not None else None
        interval = getattr(owner, "activation_checkpoint_interval", 0) or 0
        if interval <= 0:
            return _run_layers(self._funcs)(*inputs)
        x = inputs[0] if len(inputs) == 1 else inputs
        for start in range(0, len(self._funcs), interval):
            chunk = self._funcs[start:start + interval]
            args = x if isinstance(x, tuple) else (x,)
            if owner._is_checkpointable(chunk):  # DeepSpeed's rule: checkpointable_layers, else layers with params
                checkpoint, args = _checkpoint_call(owner.activation_checkpoint_func, args)
                x = checkpoint(_run_layers(chunk), *args)
            else:
                x = _run_layers(chunk)(*args)
        return x


def _run_layers(funcs: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    """A function running `funcs` in order: one tensor goes in as is, several as one tuple."""
    def run(*inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else inputs
        for fn in funcs:
            x = fn(x)
        return x

    return run


def _checkpoint_call(func: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The checkpoint function and inputs for one chunk.

    A reentrant checkpoint whose inputs need no grad returns an output without a graph, and the chunk's
    weights would get no gradient. So when no input requires grad (data fed to a first stage), floating
    inputs are marked as needing it, as DeepSpeed's engine marks a first stage's loaded inputs; a chunk
    with no floating input at all (token ids into an embedding, which DeepSpeed's default rule would
    checkpoint and lose the grads of) goes through DeepSpeed's non-reentrant checkpoint instead.
    """
    non_reentrant = ds_checkpointing.non_reentrant_checkpoint
    if func is non_reentrant or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return func, args
    if not any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args):
        return non_reentrant, args
    return func, tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                       else a for a in args)


class PipelineStages(PipelineModule):
    """The parts of one pipeline rank, re-cut from a stock `PipelineModule` for a schedule.

    It stays a `PipelineModule` (DeepSpeed's `PipelineEngine` requires one) and keeps its attributes:
    grid, topology, `loss_fn`, seeding. Building releases the source module's layers.

    Args:
        source: the user's PipelineModule (its grid and layer specs are reused).
        layout: the cut and placement (`plan_layout`).
        pp_rank: this rank's pipeline position.
        shared_groups: (pp ranks, group, global rank of the lowest pp rank) for each shared set holding
            this rank (from `Groups.shared`).
    """

    def __init__(self, source: PipelineModule, *, layout: StageLayout, pp_rank: int,
                 shared_groups: Sequence[tuple[tuple[int, ...], Any, int]] = ()) -> None:
        nn.Module.__init__(self)
        self._adopt(source)
        self.layout = layout
        self.pp_rank = pp_rank
        self.parts = list(layout.bounds)
        self.stages: dict[int, Stage] = {}
        self._build_parts()
        local = [i for k in layout.parts_of(pp_rank) for i in range(layout.bounds[k], layout.bounds[k + 1])]
        self._local_start, self._local_stop = min(local), max(local) + 1
        for p in self.parameters():
            p.ds_pipe_replicated = False
        self.to(get_accelerator().device_name(self.local_rank))
        self.shared_grads = self._share(shared_groups)
        self.tied_comms: dict[str, Any] = {}
        # The source's layers belong to another cut and would only hold memory.
        source._modules.clear()
        source.forward_funcs = []

    def _adopt(self, source: PipelineModule) -> None:
        for name in ("micro_offset", "loss_fn", "checkpointable_layers", "seed_layers", "seed_fn", "base_seed",
                     "world_group", "global_rank", "world_size", "local_rank", "_topo", "num_stages", "_grid",
                     "stage_id", "activation_checkpoint_interval", "activation_checkpoint_func", "dynamic_shape"):
            setattr(self, name, getattr(source, name))
        self._layer_specs = list(source._layer_specs)
        self._num_layers = len(self._layer_specs)
        self.is_checkpointable_results: list[bool] = []
        self.is_checkpointable_results_interval = None
        self.forward_funcs: list[Callable[[Any], Any]] = []
        self.fwd_map: dict[str, int] = {}
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}

    def _build_layer(self, index: int) -> Callable[[Any], Any]:
        layer = self._layer_specs[index]
        if self.seed_layers:
            (self.seed_fn or ds_utils.set_random_seed)(self.base_seed + index)
        if isinstance(layer, TiedLayerSpec):
            if layer.key not in self.tied_modules:
                self.tied_modules[layer.key] = layer.build()
                self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
            module = self.tied_modules[layer.key]
            return module if layer.forward_fn is None else partial(layer.forward_fn, module)
        if isinstance(layer, PipelineModule):
            raise ConfigError(f"layer {index} is a PipelineModule; nested pipeline modules are not supported")
        module = layer.build() if isinstance(layer, LayerSpec) else layer
        if isinstance(module, nn.Module):
            self.add_module(str(index), module)
            self.fwd_map[str(index)] = len(self.forward_funcs)
        return module

    def _build_parts(self) -> None:
        layout = self.layout
        built: dict[int, Callable[[Any], Any]] = {}
        for part in layout.parts_of(self.pp_rank):  # ascending layer order keeps RNG use deterministic
            for index in range(layout.bounds[part], layout.bounds[part + 1]):
                built[index] = self._build_layer(index)
                self.forward_funcs.append(built[index])
        parts = {part: Stage(part, [(i, built[i]) for i in range(layout.bounds[part], layout.bounds[part + 1])],
                             owner=self)
                 for part in layout.parts_of(self.pp_rank)}
        for stage in layout.stages_of(self.pp_rank):
            self.stages[stage] = parts[layout.stage_to_part[stage]]

    def _share(self, shared_groups: Sequence[tuple[tuple[int, ...], Any, int]]
               ) -> tuple[tuple[Any, tuple[nn.Parameter, ...]], ...]:
        """Group this rank's parameters by the set of ranks that hold copies; sync them; flag replicas."""
        layout = self.layout
        by_ranks: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for part in layout.parts_of(self.pp_rank):
            for index in range(layout.bounds[part], layout.bounds[part + 1]):
                if str(index) in self._modules:
                    params = list(self._modules[str(index)].parameters())
                    by_ranks.setdefault(layout.part_owners(part), []).extend(params)
                    for p in params:
                        p.ds_pipe_replicated = self.pp_rank != layout.part_owner(part)
        for key, module in self.tied_modules.items():
            by_ranks.setdefault(layout.tied_owners(key), []).extend(module.parameters())
            for p in module.parameters():
                p.ds_pipe_replicated = self.pp_rank != layout.tied_owner(key)
        groups = {ranks: (group, src) for ranks, group, src in shared_groups}
        shared = []
        for ranks, params in sorted(by_ranks.items()):
            unique = tuple(dict.fromkeys(params))
            if len(ranks) < 2 or not unique:
                continue
            group, src = groups[ranks]
            for p in unique:
                torch.distributed.broadcast(p.data, src=src, group=group)
            shared.append((group, unique))
        return tuple(shared)

    def _precompute_checkpointable_values(self) -> None:
        """DeepSpeed's engine calls this for its own chunking; each `Stage` chunks its own layers instead."""

    def forward(self, forward_input: Any) -> Any:
        """Not used: the engine runs `self.stages[stage](x)` for each scheduled action."""
        raise RuntimeError("PipelineStages runs stage by stage (engine.train_batch); call stages[s](x) instead")

    def _writes_layer(self, index: int) -> bool:
        owner = self.layout.part_owner(self.layout.part_of_layer(index))
        return self.pp_rank == owner and self._grid.data_parallel_id == 0

    def _layer_items(self) -> list[tuple[int, Any]]:
        return [(i, fn) for stage in dict.fromkeys(self.stages.values())
                for i, fn in zip(stage.layer_indices, stage._funcs)]

    def _layer_path(self, ckpt_dir: str, index: int) -> str:
        path = os.path.join(ckpt_dir, f"layer_{index:02d}")
        rank_repr = self._grid._topo.get_rank_repr(rank=self.global_rank)
        return path + (f"-{rank_repr}" if rank_repr else "") + "-model_states.pt"

    def save_state_dict(self, save_dir: str, checkpoint_engine: Any, exclude_frozen_params: bool = False) -> None:
        """Write one `layer_XX-model_states.pt` per layer (DeepSpeed's format), each by one owner rank."""
        checkpoint_engine.makedirs(save_dir, exist_ok=True)
        for index, fn in self._layer_items():
            if not self._writes_layer(index) or not hasattr(fn, "state_dict"):
                continue
            state = fn.state_dict()
            if exclude_frozen_params:
                for name in [n for n, p in fn.named_parameters() if not p.requires_grad]:
                    del state[name]
            checkpoint_engine.save(state_dict=state, path=self._layer_path(save_dir, index))

    def load_state_dir(self, load_dir: str, checkpoint_engine: Any, strict: bool = True) -> None:
        """Load every local layer (both parts, every copy) from DeepSpeed-format layer files."""
        mp_rank = self._grid.get_slice_parallel_rank()
        mp_size = self._grid.get_slice_parallel_world_size()
        for index, fn in self._layer_items():
            if not hasattr(fn, "load_state_dict"):
                continue
            files = sorted(glob.glob(os.path.join(load_dir, f"layer_{index:02d}-*model_states.pt")))
            loader = SDLoaderFactory.get_sd_loader(files, version=2.0, checkpoint_engine=checkpoint_engine)
            _, state, _ = loader.load(mp_size, mp_rank, module_key=None, is_pipe_parallel=True)
            fn.load_state_dict(state, strict=strict)
