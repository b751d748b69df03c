"""Forward+backward throughput of one MoE layer: dualmoe's MoELayer vs DeepSpeed's MoE vs transformers'.

    python bench/moe.py --json                                  # one GPU (EP=1), DeepSeek-V3-like shape
    torchrun --nproc_per_node 4 bench/moe.py --json             # EP=4 (dualmoe and DeepSpeed)
    python bench/moe.py --tiny --json                           # CPU smoke run (tiny shape, fp32)

Default shape (DeepSeek-V3 scaled to one GPU): hidden 2048, 64 routed experts + 1 shared, expert FFN
1408, top-8 in 8 groups keeping 4, 8192 tokens per rank, bf16. Implementations (`--impls`):

* dualmoe    `dualmoe.moe.layer.MoELayer`: sigmoid group-limited routing, dropless all-to-all,
             grouped GEMM on the home experts in place (`--redundant R` adds R replica slots; only
             those on another rank than their expert's home get buffers). Also times the per-step
             boundary work (`reduce_slot_grads` + `refresh_slots`: zero with R = 0), reported
             separately, and counts GEMMs that missed grouped_mm (`grouped_mm_fallbacks`, want {}).
* deepspeed  `deepspeed.moe.layer.MoE` (softmax top-k gate, `drop_tokens=False`, the same SwiGLU expert,
             the same shared expert added outside), EP over all ranks.
* hf         transformers `DeepseekV3MoE` (experts "grouped_mm" where available, else its default);
             single process only, so it runs on rank 0 with EP=1 only.

A measurement = `--warmup` untimed then `--iters` timed forward+backward passes of `y.float().pow(2).mean()`
on fresh random inputs (same on every implementation); tokens/s per rank = tokens / mean seconds.
Prints a table, or one JSON object per implementation with `--json` (rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    tokens: int


FULL = Shape(hidden=2048, ffn=1408, experts=64, top_k=8, n_group=8, topk_group=4, tokens=8192)
TINY = Shape(hidden=64, ffn=32, experts=8, top_k=2, n_group=4, topk_group=2, tokens=256)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized shape in fp32 (smoke test)")
    p.add_argument("--impls", default="dualmoe,deepspeed,hf", help="comma list of dualmoe, deepspeed, hf")
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (default: shape's)")
    p.add_argument("--redundant", type=int, default=0, help="redundant slots for dualmoe (multiple of EP)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per implementation")
    p.add_argument("--trace-dir", default=None,
                   help="after timing, profile one more iteration (and boundary) of each implementation into "
                        "DIR/moe_<impl>_ep<EP>_rank<r>.json; summarise with bench/trace_summary.py")
    return p.parse_args(argv)


def _setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():
        # DeepSpeed's MoE needs a process group even on one rank (else it tries MPI discovery).
        if world == 1:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


Step = Callable[[torch.Tensor], torch.Tensor]


def _build_dualmoe(shape: Shape, world: int, redundant: int, dtype: torch.dtype, device: torch.device):
    from dualmoe.moe.config import MoEConfig, RouterConfig
    from dualmoe.moe.layer import MoELayer

    cfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, ep_size=world, num_redundant_experts=redundant,
                    num_shared_experts=1, router=RouterConfig(n_group=shape.n_group, topk_group=shape.topk_group,
                                                              routed_scaling_factor=2.5))
    group = dist.new_group(list(range(world))) if world > 1 else None
    layer = MoELayer(cfg, hidden_size=shape.hidden, ffn_hidden_size=shape.ffn, ep_group=group, seed=0,
                     dtype=dtype, device=device)

    def boundary() -> None:  # once per optimizer step, not per micro-batch
        layer.reduce_slot_grads()
        layer.refresh_slots()

    return layer, layer, boundary


def _build_deepspeed(shape: Shape, world: int, dtype: torch.dtype, device: torch.device):
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    moe = MoE(hidden_size=shape.hidden, expert=_SwiGLU(shape.hidden, shape.ffn), num_experts=shape.experts,
              ep_size=world, k=shape.top_k, drop_tokens=False, use_rts=False)
    name = f"ep_size_{world}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(world)
    moe.set_deepspeed_parallelism()
    shared = _SwiGLU(shape.hidden, shape.ffn)
    module = nn.ModuleDict({"moe": moe, "shared": shared}).to(device=device, dtype=dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return module["moe"](x)[0] + module["shared"](x)

    return module, forward, None


def _build_hf(shape: Shape, dtype: torch.dtype, device: torch.device):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=shape.hidden, moe_intermediate_size=shape.ffn, n_routed_experts=shape.experts,
                           num_experts_per_tok=shape.top_k, n_group=shape.n_group, topk_group=shape.topk_group,
                           n_shared_experts=1, routed_scaling_factor=2.5)
    impl = "grouped_mm" if device.type == "cuda" else "eager"
    cfg._experts_implementation = impl
    module = DeepseekV3MoE(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    module = module.to(device=device, dtype=dtype)
    return module, module, None, impl


def _time(module: nn.Module, forward: Step, boundary: Callable[[], None] | None, shape: Shape,
          dtype: torch.dtype, device: torch.device, warmup: int, iters: int,
          trace: str | None = None) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(1234 + (dist.get_rank() if dist.is_initialized() else 0))
    inputs = [torch.randn(shape.tokens, shape.hidden, generator=gen, device=device, dtype=dtype)
              for _ in range(2)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()

    def one(i: int) -> None:
        x = inputs[i % 2].requires_grad_(True)
        forward(x).float().pow(2).mean().backward()
        x.grad = None

    for i in range(warmup):
        one(i)
        if boundary is not None:
            boundary()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for i in range(iters):
        one(i)
    sync()
    seconds = (time.perf_counter() - start) / iters
    out = {"ms_per_iter": seconds * 1e3, "tokens_per_s_per_rank": shape.tokens / seconds}
    if boundary is not None:
        sync()
        start = time.perf_counter()
        boundary()
        sync()
        out["boundary_ms_per_step"] = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            one(0)
            if boundary is not None:
                boundary()
            sync()
        os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
        prof.export_chrome_trace(trace)
    module.zero_grad(set_to_none=True)
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> list[dict]:
    args = _args(argv)
    rank, world, device = _setup()
    shape = TINY if args.tiny else FULL
    if args.tokens:
        shape = Shape(**{**asdict(shape), "tokens": args.tokens})
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    iters = args.iters if args.iters is not None else (2 if args.tiny else 20)
    torch.manual_seed(0)
    results = []
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        extra = {}
        if impl == "dualmoe":
            module, fwd, boundary = _build_dualmoe(shape, world, args.redundant, dtype, device)
            extra["redundant"] = args.redundant
            extra["replica_rows"] = module.experts.layout.num_replicas
        elif impl == "deepspeed":
            module, fwd, boundary = _build_deepspeed(shape, world, dtype, device)
        elif impl == "hf":
            if world > 1:
                continue  # no expert parallelism in transformers' block
            module, fwd, boundary, extra["experts_implementation"] = _build_hf(shape, dtype, device)
        else:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; choose from dualmoe, deepspeed, hf")
        trace = (os.path.join(args.trace_dir, f"moe_{impl}_ep{world if impl != 'hf' else 1}_rank{rank}.json")
                 if args.trace_dir else None)
        timing = _time(module, fwd, boundary, shape, dtype, device, warmup, iters, trace)
        if impl == "dualmoe":
            from dualmoe.moe.grouped import fallback_counts

            timing["grouped_mm_fallbacks"] = fallback_counts()
        results.append({"impl": impl, "ep": world if impl != "hf" else 1, "world": world,
                        "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), **asdict(shape),
                        **extra, **timing})
        del module, fwd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        for r in results:
            if args.json:
                print(json.dumps(r))
            else:
                print(f"{r['impl']:>10} ep={r['ep']} {r['tokens_per_s_per_rank']:>12.0f} tok/s/rank "
                      f"{r['ms_per_iter']:8.2f} ms/iter  {r['device']}", file=sys.stdout)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
