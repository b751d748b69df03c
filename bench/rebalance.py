"""Training step time of MoE layers at EP = world size under Zipf-skewed routing, with and without EPLB.

    torchrun --nproc_per_node 4 bench/rebalance.py --json                     # GPUs, EP=4, bf16
    torchrun --standalone --nproc_per_node 2 bench/rebalance.py --tiny --json  # CPU smoke run (gloo, fp32)

Routing is synthetic so the skew is exactly what is asked: every layer's router is replaced by draws of
top-k distinct experts per token from a Zipf(s) popularity over a random permutation of the experts (the
same permutation on every rank, fresh tokens every step; as SGLang's "fake" dispatch for benchmarks).
Everything else is the real training path: dispatch all-to-all, grouped SwiGLU experts on slots, combine,
backward, `reduce_slot_grads`, an SGD step, `end_step` (statistics + slot refresh).

Phases on the same model and GPUs: (1) `--warmup` then `--steps` timed steps on the initial identity
placement (no rebalancing); the statistics window fills meanwhile; (2) one rebalance planned from that
window (its stall is timed and reported: plan, transfers, agreement, commit); (3) `--warmup` then
`--steps` timed steps on the new placement. With `--interval K` phase 3 also rebalances every K steps
from a sliding window and the stalls are included in its time. A step is timed from a barrier to a
barrier (device synchronised), so it is the slowest rank's step.

Prints a table, or one JSON object with `--json` (rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from dualmoe.moe.config import EplbConfig, MoEConfig, RouterConfig
from dualmoe.moe.hooks import end_step, reduce_slot_grads
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
    tokens: int


FULL = Shape(layers=2, hidden=2048, ffn=1408, experts=64, redundant_per_rank=4, top_k=8, tokens=8192)
TINY = Shape(layers=2, hidden=16, ffn=16, experts=8, redundant_per_rank=2, top_k=2, tokens=128)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized shape in fp32 (smoke test)")
    p.add_argument("--zipf", type=float, default=0.6, help="Zipf exponent of expert popularity (default 0.6)")
    p.add_argument("--tokens", type=int, help="tokens per rank (default: shape's)")
    p.add_argument("--redundant-per-rank", type=int, help="redundant slots per EP rank (default: shape's)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timed phase")
    p.add_argument("--steps", type=int, help="timed steps per phase")
    p.add_argument("--interval", type=int, default=0, help="also rebalance every K steps in phase 3 (0: once)")
    p.add_argument("--chunk-mb", type=float, default=256.0, help="migration bytes per rank per round, MiB")
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


class _ZipfRouter:
    """Replaces a layer's router: top-k distinct experts per token drawn from Zipf(s) popularity."""

    def __init__(self, layer: MoELayer, *, zipf: float, seed: int, rank: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed * 7919 + layer.layer_id)  # same permutation on every rank
        order = torch.randperm(layer.num_experts, generator=gen)
        popularity = torch.arange(1, layer.num_experts + 1, dtype=torch.float64) ** -zipf
        self.probs_E = popularity[torch.argsort(order)].float().to(device)
        self.top_k = layer.config.top_k
        self.gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + 101 * rank + layer.layer_id)

    def __call__(self, x_TD: Tensor, *, num_sequences: int = 1) -> RouterOutput:
        num_tokens = x_TD.shape[0]
        ids = torch.multinomial(self.probs_E.repeat(num_tokens, 1), self.top_k, replacement=False,
                                generator=self.gen)
        weights = torch.full(ids.shape, 1.0 / self.top_k, dtype=torch.float32, device=x_TD.device)
        return RouterOutput(topk_ids=ids, topk_weights=weights, aux_loss=None)


def _build(shape: Shape, world: int, rank: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace):
    cfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, ep_size=world,
                    num_redundant_experts=shape.redundant_per_rank * world,
                    router=RouterConfig(bias_update_rate=0.0),
                    eplb=EplbConfig(enabled=True, interval=max(args.interval, 1), window=args.steps))
    layers = []
    for i in range(shape.layers):
        layer = MoELayer(cfg, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, layer_id=i,
                         ep_group=dist.group.WORLD if world > 1 else None, dtype=dtype, device=device, seed=args.seed)
        layer.gate.forward = _ZipfRouter(layer, zipf=args.zipf, seed=args.seed, rank=rank, device=device)
        layers.append(layer)
    model = nn.Sequential(*layers)
    stats = LoadStats(layers, window=args.steps)
    rebalancer = Rebalancer(layers, stats=stats, chunk_bytes=int(args.chunk_mb * 2**20), timeout_s=600.0)
    return model, stats, rebalancer


def _step(model: nn.Module, stats: LoadStats, opt: torch.optim.Optimizer, x: Tensor) -> None:
    y = model(x)
    y.float().pow(2).mean().backward()
    reduce_slot_grads(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    end_step(model, stats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _phase(model, stats, rebalancer, opt, x, device, *, warmup: int, steps: int, interval: int) -> dict:
    for _ in range(warmup):
        _step(model, stats, opt, x)
    times, stalls = [], []
    for step in range(1, steps + 1):
        _sync(device)
        start = time.perf_counter()
        _step(model, stats, opt, x)
        report = rebalancer.step(step) if interval else None
        if report is not None:
            stalls.append(report.stall_s)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"step_ms_median": 1e3 * statistics.median(times), "step_ms_mean": 1e3 * statistics.fmean(times),
            "rebalance_stall_ms": [1e3 * s for s in stalls], "balancedness_window": stats.balancedness(
                stats.window_load().to(stats.last_LE.device))}


def _report_dict(report: RebalanceReport) -> dict:
    out = {k: getattr(report, k) for k in ("applied", "status", "num_copies", "num_remote_copies", "bytes_sent",
                                            "bytes_received", "num_rounds", "balancedness_before",
                                            "balancedness_after")}
    out.update({f"{k}_ms": 1e3 * getattr(report, k) for k in ("plan_s", "migrate_s", "agree_s", "commit_s",
                                                               "stall_s")})
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _args(argv)
    rank, world, device = _setup()
    shape = TINY if args.tiny else FULL
    shape = Shape(**{**asdict(shape), **({"tokens": args.tokens} if args.tokens else {}),
                     **({"redundant_per_rank": args.redundant_per_rank}
                        if args.redundant_per_rank is not None else {})})
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 20)
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    torch.manual_seed(args.seed + rank)
    model, stats, rebalancer = _build(shape, world, rank, device, dtype, args)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(shape.tokens, shape.hidden, dtype=dtype, device=device)
    off = _phase(model, stats, rebalancer, opt, x, device, warmup=args.warmup, steps=args.steps, interval=0)
    _sync(device)
    start = time.perf_counter()
    load = rebalancer.planning_load()
    plan = rebalancer.plan(load)
    report = rebalancer.apply(plan, load_LE=load, plan_s=time.perf_counter() - start)
    _sync(device)
    rebalance_wall_ms = 1e3 * (time.perf_counter() - start)
    on = _phase(model, stats, rebalancer, opt, x, device, warmup=args.warmup, steps=args.steps,
                interval=args.interval)
    expert_load = stats.window_load().sum(0)
    result = {"bench": "rebalance", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world": world, "ep": world, "dtype": str(dtype).replace("torch.", ""), **asdict(shape),
              "slots": shape.experts + shape.redundant_per_rank * world, "zipf": args.zipf,
              "expert_load_max_over_mean": float(expert_load.max() / expert_load.mean()),
              "warmup": args.warmup, "steps": args.steps, "interval": args.interval,
              "without": off, "with": on, "rebalance": _report_dict(report), "rebalance_wall_ms": rebalance_wall_ms,
              "speedup": off["step_ms_median"] / on["step_ms_median"]}
    if rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            r = result["rebalance"]
            print(f"EP={world} {result['device']} {result['dtype']}: {shape.layers} layers, {shape.experts} experts, "
                  f"{result['slots']} slots, top-{shape.top_k}, {shape.tokens} tokens/rank, Zipf {args.zipf}\n"
                  f"  without rebalancing {off['step_ms_median']:8.2f} ms/step (balancedness "
                  f"{off['balancedness_window']:.3f})\n"
                  f"  with rebalancing    {on['step_ms_median']:8.2f} ms/step (balancedness "
                  f"{on['balancedness_window']:.3f})  speed-up {result['speedup']:.3f}x\n"
                  f"  rebalance: {r['status']}, {r['num_copies']} copies in {r['num_rounds']} rounds, stall "
                  f"{r['stall_s_ms']:.1f} ms (plan {r['plan_s_ms']:.1f}, migrate {r['migrate_s_ms']:.1f}, agree "
                  f"{r['agree_s_ms']:.1f}, commit {r['commit_s_ms']:.1f})")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
