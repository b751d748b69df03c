"""Training step time of MoE layers at EP = world size under Zipf-skewed routing, with and without EPLB.

    torchrun --nproc_per_node 4 bench/rebalance.py --json                     # GPUs, EP=4, bf16 (issue 5)
    torchrun --nproc_per_node 4 bench/rebalance.py --shape mixtral --remote-cost auto --json
    torchrun --standalone --nproc_per_node 2 bench/rebalance.py --tiny --json  # CPU smoke run (gloo, fp32)

The layers are the real `MoELayer` (router GEMM, dispatch all-to-all, grouped SwiGLU experts on slots,
combine, shared expert) trained with SGD through the real step boundary (`reduce_slot_grads`, optimizer
step, `end_step`: statistics, bias update, replica refresh). Only the router's *selection* is synthetic,
so the skew is exactly what is asked: each token picks top-k distinct experts from a Zipf(s) popularity
over a random permutation of the experts (the same on every rank; fresh draws every step; Gumbel-top-k,
i.e. sampling without replacement as SGLang's "fake" dispatch), and its gate values are the real sigmoid
scores of the picked experts, so the router weight gets its real gradient.

Phases on the same model and GPUs: (1) `--warmup` then `--steps` timed steps on the initial identity
placement; the statistics window fills meanwhile; (2) one rebalance planned from that window (its stall
is timed: plan, transfers, agreement, commit); (3) `--warmup` then `--steps` timed steps on the new
placement (with `--interval K` also rebalancing every K steps, stalls included). `--timing back-to-back`
(default) runs the timed steps as training does, one after the other, and reports their mean (a barrier and
a device synchronisation before the first and after the last): the asynchronous replica refresh of one step
overlaps the next forward. `--timing barrier` times every step from a barrier to a barrier (device
synchronised) and reports the median: nothing of a step overlaps the next (the tables before 2026-11-28
afternoon). Either way it is the slowest rank's pace.

Per-phase breakdown (`phases` in the JSON, median ms per step on each rank, then mean and max over
ranks), measured with CUDA events on the compute stream (wall clock on CPU), summed over the layers:
router, dispatch (sort + split exchange; the all-to-all; regroup), experts, combine (ungroup; the
all-to-all; weighted sum), shared, backward of combine / experts / dispatch+router (from tensor grad
hooks), and the boundary: reduce_slot_grads, optimizer, end_step. A collective's time on a rank
includes waiting for its slowest peer: the hot rank shows long `experts`, the others long
`combine_a2a` / `backward_combine`. `rows_per_rank` (routed rows each rank computes, per layer and
step) is the load the planner balances; with it balanced, `experts` evens out across ranks.
`replica_rows_per_rank` (remote experts held, all layers) is what the boundary refreshes and reduces
every step: a placement that strays from the homes costs transfers in `boundary_*`.

Prints a table, or one JSON object with `--json` (rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dualmoe.moe.config import EplbConfig, MoEConfig, RouterConfig
from dualmoe.moe.grouped import fallback_counts
from dualmoe.moe.hooks import arm_slot_grad_reduce, end_step, reduce_slot_grads
from dualmoe.moe.layer import MoELayer
from dualmoe.moe.rebalance import Rebalancer, RebalanceReport
from dualmoe.moe.router import RouterOutput
from dualmoe.moe.stats import LoadStats
from torch import Tensor, nn


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    experts: int
    redundant_per_rank: int
    top_k: int
    shared: int
    tokens: int


# DeepSeek-V2-Lite's MoE layer (64 experts of 2048 x 1408, one shared expert; top-8 here): 16 experts per rank
# at EP=4, so the skew of single experts mostly averages out per rank.
FULL = Shape(layers=2, hidden=2048, ffn=1408, experts=64, redundant_per_rank=4, top_k=8, shared=1, tokens=8192)
# Mixtral-8x7B's MoE layer (8 experts of 4096 x 14336, top-2, no shared expert): 2 experts per rank at EP=4,
# as few per GPU as large-EP training has (DeepSeek-V3: 256 experts on EP=64, 4 per GPU).
MIXTRAL = Shape(layers=2, hidden=4096, ffn=14336, experts=8, redundant_per_rank=1, top_k=2, shared=0, tokens=8192)
TINY = Shape(layers=2, hidden=16, ffn=16, experts=8, redundant_per_rank=2, top_k=2, shared=1, tokens=128)
SHAPES = {"v2-lite": FULL, "mixtral": MIXTRAL, "tiny": TINY}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2-lite",
                   help="layer shape preset (default v2-lite; the flags below override its fields)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized shape in fp32 (smoke test; same as --shape tiny)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="forward+backward passes of --tokens each per optimizer step (gradient accumulation)")
    p.add_argument("--remote-cost", default=None,
                   help='eplb.remote_cost: a number or "auto" (default: the config default)')
    p.add_argument("--zipf", type=float, default=0.6, help="Zipf exponent of expert popularity (default 0.6)")
    p.add_argument("--tokens", type=int, help="tokens per rank (default: shape's)")
    p.add_argument("--redundant-per-rank", type=int, help="redundant slots per EP rank (default: shape's)")
    p.add_argument("--shared", type=int, help="shared experts per layer (default: shape's, 1)")
    p.add_argument("--layers", type=int, help="MoE layers (default: shape's, 2)")
    p.add_argument("--hidden", type=int, help="hidden size (default: shape's)")
    p.add_argument("--ffn", type=int, help="expert FFN width (default: shape's)")
    p.add_argument("--experts", type=int, help="routed experts (default: shape's)")
    p.add_argument("--top-k", type=int, help="experts per token (default: shape's)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timed phase")
    p.add_argument("--steps", type=int, help="timed steps per phase")
    p.add_argument("--interval", type=int, default=0, help="also rebalance every K steps in phase 3 (0: once)")
    p.add_argument("--chunk-mb", type=float, default=256.0, help="migration bytes per rank per round, MiB")
    p.add_argument("--max-moves", type=int, help="eplb.max_moves: slot copies per rebalance (default: no limit)")
    p.add_argument("--no-overlap-refresh", action="store_true",
                   help="moe.overlap_refresh false: refresh replicas and send their grads home at the step "
                        "boundary, blocking, on the EP group")
    p.add_argument("--no-overlap-grads", action="store_true",
                   help="moe.overlap_grad_reduce false: replica grads go home at the step boundary")
    p.add_argument("--timing", choices=("back-to-back", "barrier"), default="back-to-back",
                   help="mean of consecutive steps (default) or median of barrier-separated steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _setup() -> tuple[int, int, torch.device]:
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun, e.g. torchrun --standalone --nproc_per_node 2 bench/rebalance.py --tiny")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


# ---- synthetic selection on the real gate --------------------------------------------------------------
class _ZipfRouter:
    """A layer's router with Zipf(s)-skewed selection: real gate GEMM and scores, drawn top-k experts."""

    def __init__(self, layer: MoELayer, *, zipf: float, seed: int, rank: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed * 7919 + layer.layer_id)  # same permutation on every rank
        order = torch.randperm(layer.num_experts, generator=gen)
        popularity = torch.arange(1, layer.num_experts + 1, dtype=torch.float64) ** -zipf
        self.log_probs_E = popularity[torch.argsort(order)].log().float().to(device)
        self.gate, self.top_k = layer.gate, layer.config.top_k
        self.scaling = layer.config.router.routed_scaling_factor
        self.gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 101 * rank + layer.layer_id)

    def __call__(self, x_TD: Tensor, *, num_sequences: int = 1) -> RouterOutput:
        scores_TE = F.linear(x_TD.float(), self.gate.weight.float()).sigmoid()
        # Gumbel-top-k: the top k of log p + Gumbel noise are k draws without replacement from p.
        uniform = torch.rand(scores_TE.shape, generator=self.gen, device=x_TD.device).clamp_(1e-20, 1.0 - 1e-7)
        ids_TK = (self.log_probs_E - (-uniform.log()).log()).topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        return RouterOutput(topk_ids=ids_TK, topk_weights=weights_TK, aux_loss=None)


# ---- per-phase timing --------------------------------------------------------------------------------
class _Timeline:
    """Spans of one step on this rank: CUDA events on the current stream (GPU), or wall clock (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, Any, Any]] = []
        self.open: dict[tuple[str, int], Any] = {}
        self.rows: list[int] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def span(self, name: str, start: Any) -> None:
        self.spans.append((name, start, self.mark()))

    def start(self, name: str, layer: int) -> None:
        self.open[(name, layer)] = self.mark()

    def stop(self, name: str, layer: int) -> None:
        start = self.open.pop((name, layer), None)
        if start is not None:
            self.span(name, start)

    def collect(self) -> dict[str, float]:
        """ms per phase of the finished step (call after the device synchronised); resets."""
        return self.collect_steps([self.cut()])[0]

    def cut(self) -> list[tuple[str, Any, Any]]:
        """Take the spans recorded so far (one step's) without reading them (events may still be pending)."""
        spans, self.spans, self.open = self.spans, [], {}
        return spans

    def collect_steps(self, steps: list[list[tuple[str, Any, Any]]]) -> list[dict[str, float]]:
        """ms per phase of every step cut with `cut` (call after the device synchronised)."""
        out = []
        for spans in steps:
            phases: dict[str, float] = defaultdict(float)
            for name, start, end in spans:
                phases[name] += start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
            out.append(dict(phases))
        return out


def _timed(timeline: _Timeline, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = timeline.mark()
        out = fn(*args, **kwargs)
        timeline.span(name, start)
        return out

    return wrapper


def _hook(tensor: Tensor, fn: Callable[[], None]) -> None:
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: fn())


def _instrument(layer: MoELayer, timeline: _Timeline) -> None:
    """Wrap the layer's stages (instance attributes) with spans; backward spans come from grad hooks."""
    lid, d = layer.layer_id, layer.dispatcher
    layer.gate.forward = _timed(timeline, "router", layer.gate.forward)
    preprocess = d.dispatch_preprocess

    def dispatch_preprocess(x_TD: Tensor, position_TK: Tensor) -> tuple[Tensor, Any]:
        _hook(x_TD, lambda: timeline.stop("backward_dispatch_router", lid))  # the layer input's grad: done
        start = timeline.mark()
        x_ND, state = preprocess(x_TD, position_TK)
        timeline.span("dispatch_pre", start)
        timeline.rows.append(sum(state.tokens_per_local_slot))
        return x_ND, state

    d.dispatch_preprocess = dispatch_preprocess
    d.token_dispatch = _timed(timeline, "dispatch_a2a", d.token_dispatch)
    d.dispatch_postprocess = _timed(timeline, "dispatch_post", d.dispatch_postprocess)
    experts_forward = layer.experts.forward

    def experts(x_MD: Tensor, rows: Any) -> Tensor:
        start = timeline.mark()
        y_MD = experts_forward(x_MD, rows)
        timeline.span("experts", start)

        def experts_grad() -> None:
            timeline.stop("backward_combine", lid)
            timeline.start("backward_experts", lid)

        def input_grad() -> None:
            timeline.stop("backward_experts", lid)
            timeline.start("backward_dispatch_router", lid)

        _hook(y_MD, experts_grad)
        _hook(x_MD, input_grad)
        return y_MD

    layer.experts.forward = experts
    d.combine_preprocess = _timed(timeline, "combine_pre", d.combine_preprocess)
    d.token_combine = _timed(timeline, "combine_a2a", d.token_combine)
    postprocess = d.combine_postprocess

    def combine_postprocess(y_ND: Tensor, weights_TK: Tensor, state: Any) -> Tensor:
        start = timeline.mark()
        y_TD = postprocess(y_ND, weights_TK, state)
        timeline.span("combine_post", start)
        _hook(y_TD, lambda: timeline.start("backward_combine", lid))
        return y_TD

    d.combine_postprocess = combine_postprocess
    if layer.shared_experts is not None:
        layer.shared_experts.forward = _timed(timeline, "shared", layer.shared_experts.forward)


# ---- model and steps ----------------------------------------------------------------------------------
def _build(shape: Shape, world: int, rank: int, device: torch.device, dtype: torch.dtype,
           args: argparse.Namespace) -> tuple[nn.Module, LoadStats, Rebalancer, _Timeline]:
    remote = {} if args.remote_cost is None else {
        "remote_cost": args.remote_cost if args.remote_cost == "auto" else float(args.remote_cost)}
    cfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, ep_size=world,
                    overlap_refresh=not args.no_overlap_refresh, overlap_grad_reduce=not args.no_overlap_grads,
                    num_redundant_experts=shape.redundant_per_rank * world, num_shared_experts=shape.shared,
                    router=RouterConfig(bias_update_rate=0.0, routed_scaling_factor=2.5),
                    eplb=EplbConfig(enabled=True, interval=max(args.interval, 1), window=args.steps,
                                    max_moves=args.max_moves, **remote))
    timeline = _Timeline(device)
    layers = []
    for i in range(shape.layers):
        layer = MoELayer(cfg, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, layer_id=i,
                         ep_group=dist.group.WORLD if world > 1 else None, dtype=dtype, device=device, seed=args.seed)
        layer.gate.forward = _ZipfRouter(layer, zipf=args.zipf, seed=args.seed, rank=rank, device=device)
        _instrument(layer, timeline)
        layers.append(layer)
    model = nn.Sequential(*layers)
    stats = LoadStats(layers, window=args.steps)
    rebalancer = Rebalancer(layers, stats=stats, chunk_bytes=int(args.chunk_mb * 2**20), timeout_s=600.0)
    return model, stats, rebalancer, timeline


def _step(model: nn.Module, stats: LoadStats, opt: torch.optim.Optimizer, x: Tensor, tl: _Timeline,
          micro_batches: int = 1) -> None:
    for micro in range(micro_batches):
        start = tl.mark()
        y = model(x)
        tl.span("forward", start)
        if micro == micro_batches - 1:
            arm_slot_grad_reduce(model)  # replica grads go home during this backward (with overlap_refresh)
        start = tl.mark()
        y.float().pow(2).mean().backward()
        tl.span("backward", start)
        x.grad = None
    start = tl.mark()
    reduce_slot_grads(model)
    tl.span("boundary_reduce_slot_grads", start)
    start = tl.mark()
    opt.step()
    opt.zero_grad(set_to_none=True)
    tl.span("boundary_optimizer", start)
    start = tl.mark()
    end_step(model, stats)
    tl.span("boundary_end_step", start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _phase(model: nn.Module, stats: LoadStats, rebalancer: Rebalancer, opt: torch.optim.Optimizer, x: Tensor,
           device: torch.device, tl: _Timeline, *, warmup: int, steps: int, interval: int,
           micro_batches: int = 1, timing: str = "back-to-back") -> dict[str, Any]:
    for _ in range(warmup):
        _step(model, stats, opt, x, tl, micro_batches)
    _sync(device)
    tl.collect()
    tl.rows.clear()
    times, stalls, cuts = [], [], []
    _sync(device)
    loop_start = time.perf_counter()
    for step in range(1, steps + 1):
        if timing == "barrier":
            _sync(device)
        start = time.perf_counter()
        _step(model, stats, opt, x, tl, micro_batches)
        report = rebalancer.step(step) if interval else None
        if report is not None:
            stalls.append(report.stall_s)
        if timing == "barrier":
            _sync(device)
            times.append(time.perf_counter() - start)
        cuts.append(tl.cut())
    _sync(device)
    if timing != "barrier":
        times = [(time.perf_counter() - loop_start) / steps]
    per_step = tl.collect_steps(cuts)
    phases = {name: statistics.median(s.get(name, 0.0) for s in per_step) for name in per_step[0]}
    rows = statistics.fmean(tl.rows) if tl.rows else 0.0
    tl.rows.clear()
    headline = statistics.median(times) if timing == "barrier" else times[0]
    return {"step_ms": 1e3 * headline, "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_mean": 1e3 * statistics.fmean(times),
            "rebalance_stall_ms": [1e3 * s for s in stalls],
            "balancedness_window": stats.balancedness(stats.window_load().to(stats.last_LE.device)),
            "_phases": phases, "_rows": rows,
            "_replicas": sum(m.experts.layout.num_replicas for m in model.modules() if isinstance(m, MoELayer))}


PHASES = ("router", "dispatch_pre", "dispatch_a2a", "dispatch_post", "experts", "combine_pre", "combine_a2a",
          "combine_post", "shared", "forward", "backward_combine", "backward_experts", "backward_dispatch_router",
          "backward", "boundary_reduce_slot_grads", "boundary_optimizer", "boundary_end_step")


def _across_ranks(phase: dict[str, Any], world: int, device: torch.device) -> dict[str, Any]:
    """Gather this rank's phase medians and rows; return mean/max over ranks and the per-rank lists."""
    mine, rows, replicas = phase.pop("_phases"), phase.pop("_rows"), phase.pop("_replicas")
    # The same stages run on every rank; forward stages, then backward, then the step boundary.
    names = sorted(mine, key=lambda n: (PHASES.index(n) if n in PHASES else len(PHASES), n))
    local = torch.tensor([mine[n] for n in names] + [rows, replicas], dtype=torch.float64, device=device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    table = torch.stack(parts).cpu()  # [ranks, phases + 2]
    phase["phases"] = {name: {"mean_ms": float(table[:, i].mean()), "max_ms": float(table[:, i].max()),
                              "per_rank_ms": [round(float(v), 3) for v in table[:, i]]}
                       for i, name in enumerate(names)}
    phase["replica_rows_per_rank"] = [int(r) for r in table[:, -1]]  # remote experts held (buffers to refresh)
    per_rank_rows = table[:, -2]
    phase["rows_per_rank"] = [round(float(r), 1) for r in per_rank_rows]
    mean_rows = float(per_rank_rows.mean())
    phase["rows_max_over_mean"] = float(per_rank_rows.max()) / mean_rows if mean_rows > 0 else 1.0
    return phase


def _report_dict(report: RebalanceReport) -> dict[str, Any]:
    out = {k: getattr(report, k) for k in ("applied", "status", "num_copies", "num_remote_copies", "bytes_sent",
                                            "bytes_received", "num_rounds", "balancedness_before",
                                            "balancedness_after")}
    out.update({f"{k}_ms": 1e3 * getattr(report, k) for k in ("plan_s", "migrate_s", "agree_s", "commit_s",
                                                               "stall_s")})
    return out


def _print_table(result: dict[str, Any]) -> None:
    off, on, r = result["without"], result["with"], result["rebalance"]
    print(f"EP={result['ep']} {result['device']} {result['dtype']}, shape {result['shape']}: {result['layers']} "
          f"layers, {result['experts']} experts, {result['slots']} slots, top-{result['top_k']}, "
          f"{result['micro_batches']} x {result['tokens']} tokens/rank per step, Zipf {result['zipf']}, "
          f"remote_cost {result['remote_cost']}")
    for name, phase in (("without", off), ("with", on)):
        print(f"  {name:8s} rebalancing {phase['step_ms']:8.2f} ms/step, balancedness "
              f"{phase['balancedness_window']:.3f}, rows/rank max/mean {phase['rows_max_over_mean']:.3f}")
    print(f"  speed-up {result['speedup']:.3f}x; rebalance: {r['status']}, {r['num_copies']} copies in "
          f"{r['num_rounds']} rounds, stall {r['stall_s_ms']:.1f} ms (plan {r['plan_s_ms']:.1f})")
    print(f"  {'phase (ms, mean/max over ranks)':36s} {'without':>15s} {'with':>15s}")
    for name in off["phases"]:
        a, b = off["phases"][name], on["phases"].get(name, {"mean_ms": 0.0, "max_ms": 0.0})
        print(f"  {name:36s} {a['mean_ms']:7.2f}/{a['max_ms']:7.2f} {b['mean_ms']:7.2f}/{b['max_ms']:7.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    rank, world, device = _setup()
    if args.micro_batches < 1:
        raise SystemExit(f"--micro-batches={args.micro_batches}: must be >= 1")
    args.tiny = args.tiny or args.shape == "tiny"
    args.shape = "tiny" if args.tiny else args.shape
    base = TINY if args.tiny else SHAPES[args.shape]
    overrides = {"tokens": args.tokens, "redundant_per_rank": args.redundant_per_rank, "shared": args.shared,
                 "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts,
                 "top_k": args.top_k}
    shape = Shape(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    torch.manual_seed(args.seed + rank)
    model, stats, rebalancer, tl = _build(shape, world, rank, device, dtype, args)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(shape.tokens, shape.hidden, dtype=dtype, device=device).requires_grad_(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    off = _phase(model, stats, rebalancer, opt, x, device, tl, warmup=args.warmup, steps=args.steps, interval=0,
                 micro_batches=args.micro_batches, timing=args.timing)
    _sync(device)
    start = time.perf_counter()
    load = rebalancer.planning_load()
    plan = rebalancer.plan(load)
    report = rebalancer.apply(plan, load_LE=load, plan_s=time.perf_counter() - start)
    _sync(device)
    rebalance_wall_ms = 1e3 * (time.perf_counter() - start)
    on = _phase(model, stats, rebalancer, opt, x, device, tl, warmup=args.warmup, steps=args.steps,
                interval=args.interval, micro_batches=args.micro_batches,
                timing=args.timing)
    off, on = _across_ranks(off, world, device), _across_ranks(on, world, device)
    expert_load = stats.window_load().sum(0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"bench": "rebalance", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world": world, "ep": world, "dtype": str(dtype).replace("torch.", ""), "shape": args.shape,
              **asdict(shape), "micro_batches": args.micro_batches, "timing": args.timing,
              "overlap_refresh": not args.no_overlap_refresh, "overlap_grad_reduce": not args.no_overlap_grads,
              "slots": shape.experts + shape.redundant_per_rank * world, "zipf": args.zipf,
              "expert_load_max_over_mean": float(expert_load.max() / expert_load.mean()),
              "warmup": args.warmup, "steps": args.steps, "interval": args.interval, "max_moves": args.max_moves,
              "without": off, "with": on, "rebalance": _report_dict(report), "rebalance_wall_ms": rebalance_wall_ms,
              "remote_cost": rebalancer.last_remote_cost,
              "speedup": off["step_ms"] / on["step_ms"], "peak_mem_gib": peak,
              "grouped_mm_fallbacks": fallback_counts()}
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            _print_table(result)
    dist.barrier()  # no rank tears its process group down while a peer still uses it (gloo aborts then)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
    # The result is printed and every rank has passed the barrier in main(). Skip interpreter teardown: a
    # gloo worker thread can still be joinable when the process exits ("terminate called without an active
    # exception", seen in 1 of 6 tiny CPU runs), which would fail the launcher after a complete run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
