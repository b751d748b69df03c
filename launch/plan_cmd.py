"""`dualmoe plan`: run the EPLB planner on measured expert load; balancedness before/after, copies, plan time.

--stats is a load file: per MoE layer, tokens routed to each logical expert ([layers, experts]). A
training run writes one with `Rebalancer.dump_stats(path)` (`.pt` or `.json`; it also records the
deployed placement); a bare [L, E] array in `.pt` / `.json`, or {"load": [[...]]}, works too.

The plan is made against the current placement: --current FILE (a [L, S] physical->logical map, or a
load file that records one), else the placement recorded in the --stats file, else the identity
placement training starts from (each GPU's home experts, then replicas of the next GPU's). Balancedness
is mean/max GPU load summed over layers (1.0 = perfect); copies are slots whose expert changes (each
one expert's weights sent to one GPU). --png draws the per-GPU load of every layer before and after.

example:
  dualmoe plan --stats load.pt --gpus 32 --nodes 4 --slots 288 --groups 8 --png plan.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dualmoe.errors import ConfigError
from dualmoe.launch.argtypes import int_at_least

__all__ = ["HELP", "add_arguments", "run"]

HELP = "plan an EPLB expert placement from load statistics: balancedness before/after, copies, heatmap"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `dualmoe plan`."""
    parser.add_argument("--stats", required=True, type=Path, metavar="FILE", help="load file (.pt or .json)")
    parser.add_argument("--gpus", required=True, type=int_at_least(1), metavar="G", help="expert-parallel ranks")
    parser.add_argument("--nodes", type=int_at_least(1), default=1, metavar="N", help="nodes (default 1)")
    parser.add_argument("--slots", required=True, type=int_at_least(1), metavar="S",
                        help="physical expert slots per layer (experts + redundant), a multiple of G")
    parser.add_argument("--groups", type=int_at_least(1), default=1, metavar="K",
                        help="expert groups; hierarchical policy when K is a multiple of N > 1 (default 1)")
    parser.add_argument("--current", type=Path, metavar="FILE", help="deployed [L, S] placement (.pt or .json)")
    parser.add_argument("--max-moves", type=int_at_least(0), metavar="M", help="at most M copies per layer")
    parser.add_argument("--min-gain", type=float, default=0.0, metavar="X",
                        help="keep a layer unless its balancedness gains at least X (default 0)")
    parser.add_argument("--copy-cost", type=float, default=1e-4, metavar="C",
                        help="balancedness one copy must buy (default 1e-4; 0 takes every improving move)")
    parser.add_argument("--png", type=Path, metavar="OUT.png", help="write the per-GPU load heatmap before/after")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the load and the NEW placement (--current)")
    parser.add_argument("--threads", type=int_at_least(1), default=1, metavar="T",
                        help="torch CPU threads for planning (default 1: small tensors, threads only add overhead)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _flag_names(message: str) -> str:
    """Planner messages name parameters; the user typed flags."""
    for name, flag in (("num_slots", "--slots"), ("num_ranks", "--gpus"), ("num_nodes", "--nodes"),
                       ("num_groups", "--groups"), ("max_moves", "--max-moves"), ("min_gain", "--min-gain"),
                       ("copy_cost", "--copy-cost"), ("current:", "--current:")):
        message = message.replace(name, flag)
    return message


def _current(args: argparse.Namespace, stats: dict[str, Any], num_layers: int, num_experts: int) -> tuple[Any, str]:
    """The deployed [L, S] map and where it came from."""
    import torch
    from dualmoe.moe.checkpoint import read_load_stats
    from dualmoe.moe.placement import Placement

    if args.current is not None:
        record = read_load_stats(args.current)  # a file from --out / dump_stats, or a bare [L, S] array
        current = record["placement"]
        if current is None:
            if not bool((record["load"] == record["load"].round()).all()):
                raise ConfigError(f"--current {str(args.current)!r}: expected integer expert ids, got fractions")
            current = record["load"].to(torch.int64)
        source = str(args.current)
    elif stats["placement"] is not None:
        current, source = stats["placement"], f"recorded in {args.stats}"
    else:
        if num_experts % args.gpus:
            raise ConfigError(f"--gpus={args.gpus}: the identity placement needs the {num_experts} experts to "
                              "divide evenly over the GPUs; pass --current")
        identity = Placement.identity(num_experts, args.slots, num_ranks=args.gpus).physical_to_logical
        return torch.tensor([identity] * num_layers), "identity (training start)"
    if current.dim() == 1:
        current = current.unsqueeze(0)
    if tuple(current.shape) != (num_layers, args.slots):
        raise ConfigError(f"--current ({source}): placement has shape {tuple(current.shape)}; expected "
                          f"[{num_layers}, {args.slots}] (layers x --slots)")
    return current, source


def _summary(args: argparse.Namespace, load: Any, current: Any, source: str, plan: Any, plan_s: float) -> dict:
    from dualmoe.moe.eplb import gpu_load

    def overall(maps: Any) -> tuple[float, float]:
        loads = gpu_load(maps, load, args.gpus)
        top = loads.max(-1).values
        total = float(loads.mean(-1).sum() / top.sum()) if float(top.sum()) > 0 else 1.0
        per_layer = (loads.mean(-1) / top.clamp(min=1e-300)).where(top > 0, loads.new_ones(()))
        return total, float(per_layer.min())

    before, worst_before = overall(current)
    after, worst_after = overall(plan.physical_to_logical)
    num_layers, num_experts = load.shape
    hierarchical = args.groups % args.nodes == 0 and args.nodes > 1
    return {"layers": num_layers, "experts": num_experts, "slots": args.slots, "gpus": args.gpus,
            "nodes": args.nodes, "groups": args.groups, "policy": "hierarchical" if hierarchical else "global",
            "current": source, "balancedness_before": before, "balancedness_after": after,
            "worst_layer_before": worst_before, "worst_layer_after": worst_after, "copies": plan.num_copies,
            "copies_fraction": plan.num_copies / (num_layers * args.slots),
            "layers_changed": int((~plan.kept).sum()), "plan_ms": 1e3 * plan_s,
            "png": None if args.png is None else str(args.png), "out": None if args.out is None else str(args.out)}


def _table(summary: dict) -> str:
    s = summary
    per_gpu = s["slots"] // s["gpus"]
    return "\n".join([
        f"load: {s['layers']} layers x {s['experts']} experts",
        f"placement: {s['slots']} slots on {s['gpus']} GPUs ({per_gpu} per GPU), {s['nodes']} nodes, "
        f"{s['groups']} groups -> {s['policy']} policy",
        f"current: {s['current']}", "",
        f"  balancedness  before {s['balancedness_before']:.4f}  after {s['balancedness_after']:.4f}"
        f"  (worst layer {s['worst_layer_before']:.4f} -> {s['worst_layer_after']:.4f})",
        f"  copies        {s['copies']} of {s['layers'] * s['slots']} slots ({100 * s['copies_fraction']:.1f}%), "
        f"{s['layers_changed']} of {s['layers']} layers changed",
        f"  plan time     {s['plan_ms']:.1f} ms"])


def plot_heatmap(before_LG: Any, after_LG: Any, path: Path, *, titles: tuple[str, str]) -> Path:
    """Two panels (layers x GPUs) of GPU load / layer mean, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def normed(x: Any) -> Any:
        mean = x.mean(-1, keepdim=True)
        return (x / mean.clamp(min=1e-300)).where(mean > 0, x.new_ones(())).numpy()

    panels = [normed(before_LG), normed(after_LG)]
    top = max(1.0, float(max(p.max() for p in panels)))
    num_layers, num_gpus = panels[0].shape
    width = min(24.0, 3.0 + 0.25 * num_gpus) * 2
    height = min(16.0, 2.0 + 0.18 * num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), sharey=True, constrained_layout=True)
    image = None
    for ax, data, title in zip(axes, panels, titles, strict=True):
        image = ax.imshow(data, aspect="auto", cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("GPU (EP rank)")
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(image, ax=list(axes), label="GPU load / layer mean")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Plan, print the table (or JSON), write the heatmap and the new placement if asked."""
    import torch
    from dualmoe.errors import PlacementError
    from dualmoe.moe.checkpoint import read_load_stats, save_load_stats
    from dualmoe.moe.eplb import gpu_load, plan_placement

    torch.set_num_threads(args.threads)
    stats = read_load_stats(args.stats)
    load = stats["load"]
    if args.slots % args.gpus:
        raise ConfigError(f"--slots={args.slots}: must be a multiple of --gpus ({args.gpus}) so every GPU holds "
                          f"the same number of slots")
    if args.slots < load.shape[1]:
        raise ConfigError(f"--slots={args.slots}: must be >= the number of logical experts ({load.shape[1]}) in "
                          f"{args.stats}")
    current, source = _current(args, stats, *load.shape)
    start = time.perf_counter()
    try:
        plan = plan_placement(load, current, num_slots=args.slots, num_nodes=args.nodes, num_ranks=args.gpus,
                              num_groups=args.groups, max_moves=args.max_moves, min_gain=args.min_gain,
                              copy_cost=args.copy_cost)
    except PlacementError as exc:
        raise ConfigError(_flag_names(str(exc))) from None
    plan_s = time.perf_counter() - start
    summary = _summary(args, load, current, source, plan, plan_s)
    if args.png is not None:
        plot_heatmap(gpu_load(current, load, args.gpus), gpu_load(plan.physical_to_logical, load, args.gpus),
                     args.png, titles=(f"before: balancedness {summary['balancedness_before']:.4f}",
                                       f"after: balancedness {summary['balancedness_after']:.4f}, "
                                       f"{plan.num_copies} copies"))
    if args.out is not None:
        save_load_stats(args.out, load, placement_LS=plan.physical_to_logical, num_ranks=args.gpus,
                        step=stats["step"], layer_names=stats["layer_names"])
    print(json.dumps(summary) if args.json else _table(summary))
    return 0
