"""MoE checkpoints by LOGICAL expert: weights, placement maps, router biases and load statistics at any EP size.

Legend: E logical experts, S slots, P EP ranks, Eh = E/P home experts per rank, L layers, W stats window.

What is saved per `MoELayer` (keyed by its module name in the model):

    record = {"num_experts", "num_slots", "ep_size", "layer_id",
              "physical_to_logical": [S],            the deployed placement (after any rebalance)
              "router_bias": [E] fp32,               e_score_correction_bias
              "stats": {"window", "ring" [W, E], "ema" [E], "last" [E], "num_steps"} or None,
              "rebalancer": Rebalancer.state_dict() or None,
              "experts": {"first": f, "gate_up_proj": [n, 2I, D], "down_proj": [n, D, I],
                          "optimizer": {"gate_up_proj": {...}, "down_proj": {...}} or None}}

"experts" holds logical experts [f, f + n); optimizer entries are per-parameter state tensors of the home
shape, sliced the same way (Adam's exp_avg / exp_avg_sq; scalars such as "step" as they are). Because
experts are addressed by logical id, not by EP rank, a record loads at any EP size: each rank takes the
rows of its new home block, and the placement map is reused when S is unchanged (any S-slot map is valid
for any P dividing S), else reset to the identity.

Two forms:
* `logical_state_dict(model, ...)` / `load_logical_state_dict(model, state, ...)`: the whole model in one
  dict (experts gathered over the EP group; collective). For small models, exports and tests.
* `save_moe_checkpoint` / `load_moe_checkpoint`: files beside DeepSpeed's in `<dir>/<tag>/`, no gather:
      dualmoe_moe.<layer>.pt                       the record without "experts" (EP rank 0 writes it)
      dualmoe_moe.<layer>.experts<f>-<f+n>.pt      one home block (its EP rank, lowest global rank, writes it)
  Loading reads only the blocks that overlap this rank's new home block.

DeepSpeed (0.19.8) and why not just `client_state`: the MoE engine (`dualmoe.moe.hooks`) sets
`has_moe_layers`, so DeepSpeed writes the module state dict once (data-parallel rank 0, i.e. EP rank 0)
and per-EP-rank optimizer files (`expp_rank_<r>_..._optim_states.pt`, ZeRO-0) or per-DP-rank ZeRO files.
Its module file would hold only EP rank 0's home experts, shaped [E/P, ...], which every rank would load
(wrong experts on the others, a size error at another EP size); `client_state` lands in that same
rank-0 file, so it cannot carry other ranks' experts without gathering every expert onto one rank.
Hence `save_checkpoint(engine, ...)` / `load_checkpoint(engine, ...)` (or `MoECheckpointMixin` on the
engine class) wrap DeepSpeed's calls: homes are left out of DeepSpeed's module file (a state-dict hook,
only during the call) and travel in our files; at load the module file's missing homes are tolerated
(a load pre-hook, only during the call) and filled from our files. Optimizer state: at the same EP size
DeepSpeed's own files restore it; at another EP size a plain torch optimizer (ZeRO-0) is restored from
DeepSpeed's EP-rank-0 file for dense parameters plus our per-expert slices for the homes; ZeRO-1/2 keep
flat partitions that cannot be re-sliced, so there `load_optimizer_states=False` is required.

Load-statistics files for `dualmoe plan` (`save_load_stats` / `read_load_stats`) live here too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dualmoe.errors import ConfigError
from torch import Tensor, nn

from .layer import MoELayer
from .placement import Placement
from .stats import LoadStats

__all__ = [
    "FORMAT",
    "STATS_FORMAT",
    "MoECheckpointMixin",
    "load_checkpoint",
    "load_logical_state_dict",
    "load_moe_checkpoint",
    "logical_state_dict",
    "read_load_stats",
    "read_moe_records",
    "save_checkpoint",
    "save_load_stats",
    "save_moe_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "dualmoe.moe/1"
STATS_FORMAT = "dualmoe.load_stats/1"
_HOMES = ("gate_up_proj", "down_proj")


# ---- records -------------------------------------------------------------------------------------------
def _named_layers(model: nn.Module) -> dict[str, MoELayer]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ConfigError("the model has no MoELayer to checkpoint")
    return layers


def _stats_slice(stats: LoadStats | None, layer: MoELayer) -> dict[str, Any] | None:
    if stats is None or not any(layer is m for m in stats.layers):
        return None
    index = next(i for i, m in enumerate(stats.layers) if m is layer)
    state = stats.state_dict()
    return {"window": stats.window, "ring": state["ring"][:, index].cpu(), "ema": state["ema"][index].cpu(),
            "last": state["last"][index].cpu(), "num_steps": int(state["num_steps"])}


def _optimizer_slices(optimizer: Any, layer: MoELayer) -> dict[str, dict[str, Any]] | None:
    """Per-parameter optimizer state of the homes: entries of the home's shape (sliced by expert) and
    scalars. None unless a torch optimizer holds such state (flat ZeRO partitions are not sliceable)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    out = {}
    for name in _HOMES:
        param = getattr(layer.experts, name)
        state = optimizer.state.get(param)
        if not state:
            return None
        if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != param.shape for v in state.values()):
            logger.warning("optimizer state of %s has entries not shaped like the parameter; it is not saved by "
                           "expert (resume at the same EP size restores it through DeepSpeed)", name)
            return None
        out[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    return out


def _record(layer: MoELayer, *, stats: LoadStats | None, rebalancer: Any) -> dict[str, Any]:
    return {"num_experts": layer.num_experts, "num_slots": layer.placement.num_slots, "ep_size": layer.ep_size,
            "layer_id": layer.layer_id, "physical_to_logical": torch.tensor(layer.placement.physical_to_logical),
            "router_bias": layer.gate.e_score_correction_bias.detach().cpu().clone(),
            "stats": _stats_slice(stats, layer),
            "rebalancer": None if rebalancer is None else rebalancer.state_dict()}


def _home_block(layer: MoELayer, optimizer: Any) -> dict[str, Any]:
    block: dict[str, Any] = {"first": layer.home_experts.start}
    for name in _HOMES:
        block[name] = getattr(layer.experts, name).detach().cpu().clone()
    block["optimizer"] = _optimizer_slices(optimizer, layer)
    return block


def _gather_rows(x: Tensor, layer: MoELayer) -> Tensor:
    if layer.ep_group is None:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(layer.ep_size)]
    dist.all_gather(parts, x.contiguous(), group=layer.ep_group)
    return torch.cat(parts)


def logical_state_dict(model: nn.Module, *, stats: LoadStats | None = None, rebalancer: Any = None,
                       optimizer: Any = None) -> dict[str, Any]:
    """The MoE state of `model` by logical expert (collective over every layer's EP group).

    Args:
        model: holds the `MoELayer`s (keys are their module names).
        stats: the layers' `LoadStats` (window, EMA) to include.
        rebalancer: a `Rebalancer` whose counters to include.
        optimizer: a torch optimizer whose per-parameter state of the homes to include (gathered too).

    Returns:
        {"format": FORMAT, "layers": {name: record}} with every record's "experts" covering all E experts.
    """
    layers = {}
    for name, layer in _named_layers(model).items():
        record = _record(layer, stats=stats, rebalancer=rebalancer)
        block = _home_block(layer, optimizer)
        device = layer.experts.gate_up_proj.device
        experts: dict[str, Any] = {"first": 0}
        for key in _HOMES:
            experts[key] = _gather_rows(getattr(layer.experts, key).detach(), layer).cpu()
        if block["optimizer"] is not None:
            experts["optimizer"] = {
                key: {k: (_gather_rows(v.to(device), layer).cpu() if torch.is_tensor(v) and v.dim() > 0 else v)
                      for k, v in state.items()} for key, state in block["optimizer"].items()}
        else:
            experts["optimizer"] = None
        record["experts"] = experts
        layers[name] = record
    return {"format": FORMAT, "layers": layers}


# ---- loading records -----------------------------------------------------------------------------------
@torch.no_grad()
def load_logical_state_dict(model: nn.Module, state: Mapping[str, Any], *, stats: LoadStats | None = None,
                            rebalancer: Any = None, optimizer: Any = None) -> None:
    """Restore `logical_state_dict` output (or records assembled from checkpoint files) at this EP size.

    Every record's "experts" must cover this rank's home block. Slots are refreshed at the next forward.
    Not collective.

    Raises:
        ConfigError: format, layer names, E, or the expert range do not fit the model.
    """
    if state.get("format") != FORMAT:
        raise ConfigError(f"not a dualmoe MoE state (format {state.get('format')!r}, expected {FORMAT!r})")
    layers = _named_layers(model)
    missing = sorted(set(layers) - set(state["layers"]))
    if missing:
        raise ConfigError(f"the checkpoint has no MoE record for layers {missing}; it has {sorted(state['layers'])}")
    for name, layer in layers.items():
        _load_record(name, layer, state["layers"][name], optimizer)
    if stats is not None:
        _load_stats(stats, layers, state["layers"])
    first = state["layers"][next(iter(layers))]
    if rebalancer is not None and first.get("rebalancer") is not None:
        rebalancer.load_state_dict(first["rebalancer"])


def _load_record(name: str, layer: MoELayer, record: Mapping[str, Any], optimizer: Any) -> None:
    if int(record["num_experts"]) != layer.num_experts:
        raise ConfigError(f"layer {name!r}: the checkpoint has num_experts={record['num_experts']}, the model "
                          f"{layer.num_experts}; logical experts must match")
    experts, home = record["experts"], layer.home_experts
    first = int(experts["first"])
    stop = first + experts[_HOMES[0]].shape[0]
    if first > home.start or stop < home.stop:
        raise ConfigError(f"layer {name!r}: the record holds experts [{first}, {stop}); EP rank {layer.ep_rank} "
                          f"needs [{home.start}, {home.stop})")
    rows = slice(home.start - first, home.stop - first)
    for key in _HOMES:
        getattr(layer.experts, key).copy_(experts[key][rows])
    layer.gate.e_score_correction_bias.copy_(record["router_bias"])
    if int(record["num_slots"]) == layer.placement.num_slots:
        placement = Placement.from_physical_to_logical(record["physical_to_logical"].tolist(),
                                                       num_experts=layer.num_experts, num_ranks=layer.ep_size)
    else:
        logger.warning("layer %r: checkpoint has %s slots, the model %d; starting from the identity placement",
                       name, record["num_slots"], layer.placement.num_slots)
        placement = Placement.identity(layer.num_experts, layer.placement.num_slots, num_ranks=layer.ep_size)
    layer.set_placement(placement, refresh="lazy")
    if isinstance(optimizer, torch.optim.Optimizer) and experts.get("optimizer") is not None:
        for key in _HOMES:
            param = getattr(layer.experts, key)
            optimizer.state[param] = {
                k: (v[rows].to(param.device).clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                for k, v in experts["optimizer"][key].items()}


def _load_stats(stats: LoadStats, layers: Mapping[str, MoELayer], records: Mapping[str, Any]) -> None:
    by_layer = {id(m): records[name].get("stats") for name, m in layers.items()}
    slices = [by_layer.get(id(m)) for m in stats.layers]
    if any(s is None for s in slices):
        logger.warning("the checkpoint has no load statistics for some MoE layers; statistics start empty")
        return
    num_steps = int(slices[0]["num_steps"])
    ring = torch.zeros_like(stats._ring)
    for index, piece in enumerate(slices):  # re-window chronologically when W changed
        old_w = int(piece["window"])
        for k in range(max(0, num_steps - min(old_w, stats.window)), num_steps):
            ring[k % stats.window, index] = piece["ring"][k % old_w]
    stats.load_state_dict({"ring": ring, "ema": torch.stack([s["ema"] for s in slices]),
                           "last": torch.stack([s["last"] for s in slices]), "num_steps": num_steps})


# ---- sharded files -------------------------------------------------------------------------------------
def _meta_path(folder: Path, name: str) -> Path:
    return folder / f"dualmoe_moe.{name}.pt"


def _block_path(folder: Path, name: str, first: int, stop: int) -> Path:
    return folder / f"dualmoe_moe.{name}.experts{first:05d}-{stop:05d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _is_block_writer(layer: MoELayer) -> bool:
    """The lowest global rank among the ranks running `layer` with this EP rank writes its home block."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    group = layer.stats_group
    mine = torch.tensor([layer.ep_rank], dtype=torch.int64, device=layer.experts.gate_up_proj.device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    first = next(i for i, p in enumerate(parts) if int(p) == layer.ep_rank)
    return first == dist.get_rank(group)


def save_moe_checkpoint(folder: str | Path, model: nn.Module, *, stats: LoadStats | None = None,
                        rebalancer: Any = None, optimizer: Any = None) -> list[Path]:
    """Write the MoE files of `model` into `folder` (collective over the ranks running the layers).

    Returns:
        The files this rank wrote.
    """
    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, layer in _named_layers(model).items():
        if not _is_block_writer(layer):
            continue
        block = _home_block(layer, optimizer)
        path = _block_path(out_dir, name, layer.home_experts.start, layer.home_experts.stop)
        _atomic_save(block, path)
        written.append(path)
        if layer.ep_rank == 0:
            path = _meta_path(out_dir, name)
            _atomic_save({"format": FORMAT, **_record(layer, stats=stats, rebalancer=rebalancer)}, path)
            written.append(path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return written


def read_moe_records(folder: str | Path, model: nn.Module) -> dict[str, Any]:
    """The records of this rank's MoE layers, with "experts" covering each layer's home block."""
    in_dir = Path(folder)
    layers = {}
    for name, layer in _named_layers(model).items():
        meta_path = _meta_path(in_dir, name)
        if not meta_path.exists():
            raise ConfigError(f"no MoE record for layer {name!r} in {in_dir} (expected {meta_path.name}); was the "
                              "checkpoint saved with dualmoe.moe.checkpoint.save_checkpoint?")
        record = torch.load(meta_path, map_location="cpu", weights_only=False)
        old_ep = int(record["ep_size"])
        per_old = int(record["num_experts"]) // old_ep
        home = layer.home_experts
        blocks = []
        for old_rank in range(home.start // per_old, (home.stop - 1) // per_old + 1):
            path = _block_path(in_dir, name, old_rank * per_old, (old_rank + 1) * per_old)
            blocks.append(torch.load(path, map_location="cpu", weights_only=False))
        record["experts"] = _concat_blocks(blocks)
        layers[name] = record
    return {"format": FORMAT, "layers": layers}


def _concat_blocks(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"first": blocks[0]["first"]}
    for key in _HOMES:
        out[key] = torch.cat([b[key] for b in blocks])
    if all(b.get("optimizer") is not None for b in blocks):
        out["optimizer"] = {key: {k: (torch.cat([b["optimizer"][key][k] for b in blocks])
                                      if torch.is_tensor(v) and v.dim() > 0 else v)
                                  for k, v in blocks[0]["optimizer"][key].items()} for key in _HOMES}
    else:
        out["optimizer"] = None
    return out


def load_moe_checkpoint(folder: str | Path, model: nn.Module, *, stats: LoadStats | None = None,
                        rebalancer: Any = None, optimizer: Any = None) -> int:
    """Restore the MoE files of `folder` into `model` at its EP size (not collective).

    Returns:
        The EP size the checkpoint was saved at.
    """
    records = read_moe_records(folder, model)
    load_logical_state_dict(model, records, stats=stats, rebalancer=rebalancer, optimizer=optimizer)
    return int(next(iter(records["layers"].values()))["ep_size"])


# ---- DeepSpeed engines ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _homes_outside_module_state(model: nn.Module) -> Iterator[None]:
    """While active, module state dicts omit home experts and module loads tolerate their absence."""
    handles = []

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in _HOMES:
            state.pop(prefix + key, None)

    def fill(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in _HOMES:  # keep the current value; our files restore the right one afterwards
            state.setdefault(prefix + key, getattr(module, key).detach())
            if state[prefix + key].shape != getattr(module, key).shape:
                state[prefix + key] = getattr(module, key).detach()

    for layer in _named_layers(model).values():
        handles.append(layer.experts.register_state_dict_post_hook(drop))
        handles.append(layer.experts.register_load_state_dict_pre_hook(fill))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def save_checkpoint(engine: Any, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None,
                    *, save: Any = None, **kwargs: Any) -> Any:
    """`engine.save_checkpoint` plus the MoE files in the same tag folder (all ranks call it).

    Args:
        engine: a DeepSpeed engine whose model holds `MoELayer`s (`moe_stats` / `moe_rebalancer` are saved
            when present).
        save_dir, tag, client_state, **kwargs: as DeepSpeed's `save_checkpoint`.
        save: the DeepSpeed method to call (default `engine.save_checkpoint`; the mixin passes its parent's).

    Returns:
        What DeepSpeed returns.
    """
    tag = f"global_step{engine.global_steps}" if tag is None else tag
    save = engine.save_checkpoint if save is None else save
    with _homes_outside_module_state(engine.module):
        result = save(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
    save_moe_checkpoint(Path(save_dir) / str(tag), engine.module, stats=getattr(engine, "moe_stats", None),
                        rebalancer=getattr(engine, "moe_rebalancer", None), optimizer=engine.optimizer)
    return result


def load_checkpoint(engine: Any, load_dir: str, tag: Any = None, *, load_optimizer_states: bool = True,
                    load: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """`engine.load_checkpoint` plus the MoE files, at the engine's EP size (all ranks call it).

    Raises:
        ConfigError: the EP size changed, `load_optimizer_states=True`, and the optimizer keeps flat
            partitions (ZeRO-1/2, bf16/fp16 wrappers) that cannot be re-sliced by logical expert.

    Returns:
        (load path, client state), as DeepSpeed.
    """
    load = engine.load_checkpoint if load is None else load
    if tag is None:
        latest = Path(load_dir) / "latest"
        tag = latest.read_text().strip() if latest.exists() else tag
    folder = Path(load_dir) / str(tag)
    layers = _named_layers(engine.module)
    saved_ep = int(torch.load(_meta_path(folder, next(iter(layers))), map_location="cpu",
                              weights_only=False)["ep_size"])
    current_ep = next(iter(layers.values())).ep_size
    resized = saved_ep != current_ep
    torch_optimizer = isinstance(engine.optimizer, torch.optim.Optimizer)
    if resized and load_optimizer_states and not torch_optimizer:
        raise ConfigError(f"load_optimizer_states=True: the checkpoint was saved at moe.ep_size={saved_ep}, this "
                          f"run has {current_ep}, and {type(engine.optimizer).__name__} keeps flat partitions that "
                          "cannot be re-sliced by expert; pass load_optimizer_states=False (weights, placement, "
                          "router biases and statistics still load) or resume at the saved EP size")
    with _homes_outside_module_state(engine.module):
        result = load(load_dir, tag=tag, load_optimizer_states=load_optimizer_states and not resized, **kwargs)
    if resized and load_optimizer_states:
        _load_dense_optimizer_state(engine, load_dir, tag)
    load_moe_checkpoint(folder, engine.module, stats=getattr(engine, "moe_stats", None),
                        rebalancer=getattr(engine, "moe_rebalancer", None),
                        optimizer=engine.optimizer if load_optimizer_states else None)
    return result


def _load_dense_optimizer_state(engine: Any, load_dir: str, tag: Any) -> None:
    """Another EP size, torch optimizer: DeepSpeed's EP-rank-0 file for every parameter (homes are then
    overwritten by logical slices); home entries get placeholders of the current shape first."""
    path = engine._get_optimizer_ckpt_name(load_dir, tag, 0)
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer"]
    params = [p for group in engine.optimizer.param_groups for p in group["params"]]
    homes = {id(getattr(m.experts, k)) for m in _named_layers(engine.module).values() for k in _HOMES}
    for index, param in enumerate(params):
        if id(param) in homes:
            saved["state"].pop(index, None)
    engine.optimizer.load_state_dict(saved)


class MoECheckpointMixin:
    """Engine mixin: `save_checkpoint` / `load_checkpoint` also handle the MoE files (see the module doc).

    Put it before the MoE engine class, e.g. `type("E", (MoECheckpointMixin, moe_engine_class(base)), {})`.
    """

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> Any:
        """DeepSpeed's `save_checkpoint` plus the MoE files."""
        parent = super().save_checkpoint  # type: ignore[misc]
        return save_checkpoint(self, save_dir, tag, client_state, save=parent, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[Any, Any]:
        """DeepSpeed's `load_checkpoint` plus the MoE files (any EP size)."""
        parent = super().load_checkpoint  # type: ignore[misc]
        return load_checkpoint(self, load_dir, tag, load_optimizer_states=load_optimizer_states, load=parent,
                               load_module_strict=load_module_strict, load_lr_scheduler_states=load_lr_scheduler_states,
                               load_module_only=load_module_only, custom_load_fn=custom_load_fn)


# ---- load statistics files (dualmoe plan) ---------------------------------------------------------------
def save_load_stats(path: str | Path, load_LE: Tensor, *, placement_LS: Tensor | None = None,
                    num_ranks: int | None = None, step: int | None = None,
                    layer_names: Sequence[str] | None = None) -> Path:
    """Write per-expert load for `dualmoe plan --stats`: `.pt` (tensors) or `.json` (lists).

    Format (both): {"format": STATS_FORMAT, "load": [L, E] float64, "placement": [L, S] int64 or None,
    "num_ranks": P or None, "step": int or None, "layer_names": [L] or None}.
    """
    out = Path(path)
    record: dict[str, Any] = {"format": STATS_FORMAT, "load": load_LE.detach().cpu().to(torch.float64),
                              "placement": None if placement_LS is None else placement_LS.detach().cpu().long(),
                              "num_ranks": num_ranks, "step": step,
                              "layer_names": None if layer_names is None else list(layer_names)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        as_json = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in record.items()}
        out.write_text(json.dumps(as_json))
    elif out.suffix == ".pt":
        torch.save(record, out)
    else:
        raise ConfigError(f"stats file {str(out)!r}: use a .pt or .json suffix")
    return out


def read_load_stats(path: str | Path) -> dict[str, Any]:
    """Read a load file: the `save_load_stats` format, a bare [L, E] (or [E]) tensor / nested list, or a
    dict with a "load" entry. Returns the `save_load_stats` fields with tensors ("placement" may be None).

    Raises:
        ConfigError: unreadable file, unknown suffix, or a load that is not a finite [L, E] array >= 0.
    """
    src = Path(path)
    if not src.exists():
        raise ConfigError(f"stats file {str(src)!r} does not exist")
    try:
        if src.suffix == ".json":
            raw: Any = json.loads(src.read_text())
        elif src.suffix == ".pt":
            raw = torch.load(src, map_location="cpu", weights_only=False)
        else:
            raise ConfigError(f"stats file {str(src)!r}: use a .pt or .json suffix")
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"stats file {str(src)!r} could not be read: {err}") from None
    record = dict(raw) if isinstance(raw, Mapping) else {"load": raw}
    if "load" not in record:
        raise ConfigError(f"stats file {str(src)!r}: no 'load' entry; expected an [L, E] array or "
                          f"{{'load': [[...]]}}")
    load = torch.as_tensor(record["load"], dtype=torch.float64)
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.dim() != 2 or load.numel() == 0 or not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ConfigError(f"stats file {str(src)!r}: 'load' must be a non-empty [layers, experts] array of finite "
                          f"values >= 0; got shape {tuple(load.shape)}")
    placement = record.get("placement")
    return {"format": record.get("format", STATS_FORMAT), "load": load,
            "placement": None if placement is None else torch.as_tensor(placement, dtype=torch.int64),
            "num_ranks": record.get("num_ranks"), "step": record.get("step"),
            "layer_names": record.get("layer_names")}
