"""Pipeline step time and memory: dualmoe's schedules vs DeepSpeed's PipelineEngine (1F1B) and DualPipeVEngine.

    torchrun --nproc-per-node 2 bench/pipeline.py --json out.json          # P = 2, m = 8 and 16
    torchrun --nproc-per-node 4 bench/pipeline.py --json out.json          # P = 4
    torchrun --nproc-per-node 2 bench/pipeline.py --tiny                   # CPU/gloo smoke run

Every (contender, m) runs in fresh processes: the torchrun workers only drive (a gloo group, no device
work); for each run they start one child per rank with its own rendezvous port, wait for it (killing it
after `--child-timeout-s`), and rank 0 collects the result. A hung contender costs its own row only, and
peak memory is the contender's own (engines in one process are not all freed: DeepSpeed's PipelineEngine
keeps its engine alive through hooks on the loss graph). `--in-process` runs the given contenders and m in
the current processes instead (what each child does).

Model: `--layers` (16) residual MLP blocks `x + W2 gelu(W1 x)`, hidden `--hidden` (2048), FFN 4x, one micro-batch
`--micro-batch-size` (2) x `--seq` (2048) tokens, bf16 with DeepSpeed's BF16_Optimizer (ZeRO-0) and torch Adam, MSE
loss. Every contender gets the same stock `PipelineModule` layer list (DeepSpeed's DualPipeVEngine its
`DualPipeVModule`), the same data and `gradient_accumulation_steps = m`; the pipeline spans all ranks (DP = 1).

Contenders (`--contenders`): ds-1f1b (DeepSpeed PipelineEngine), ds-dualpipev (DeepSpeed 0.19.8 DualPipeVEngine),
and dualmoe's dualpipev, dualpipe, zbv, zb1p, 1f1b (`pipeline.schedule`); a dualmoe name with the suffix
":dynamic" runs with `pipeline.static_shapes: false` (a shape header per message), and "@KEY=VALUE" suffixes
set other `pipeline` keys (e.g. "dualpipev@recv_posting=ahead"; VALUE is read as JSON). Per contender and m:
`--warmup` untimed steps, then `--steps` timed `train_batch` calls, each started after a barrier and ended by a
device sync; the step time is the slowest rank's. Memory per rank: peak allocated during the timed steps, and the
activation peak = peak minus what was allocated when the step began (parameters, grads, optimizer state).
Host columns (slowest rank, median): "host ms", when the host reached the optimizer step (all forward/backward
work launched); "cpu ms", the main thread's CPU time in `train_batch`. cpu close to the step time means the host,
not the device, sets the pace.
Rank 0 prints each result as it lands, then a table (speed-up vs ds-1f1b at the same m), and writes `--json`.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

OURS = ("dualpipev", "dualpipe", "zbv", "zb1p", "1f1b")
DEFAULT_CONTENDERS = "ds-1f1b,ds-dualpipev,1f1b,zb1p,zbv,dualpipev,dualpipe"
DYNAMIC = ":dynamic"


class MLPBlock(nn.Module):
    """x + W2 gelu(W1 x): the benchmark's layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


def mse(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32."""
    return (outputs.float() - labels.float()).pow(2).mean()


@dataclass
class Result:
    """One contender at one m."""

    contender: str
    pipe: int
    micro_batches: int
    median_ms: float | None = None
    mean_ms: float | None = None
    step_ms: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    activation_peak_mb: list[float] = field(default_factory=list)
    host_to_optimizer_ms: float | None = None  # median over steps, slowest rank: host reached the optimizer step
    host_cpu_ms: float | None = None  # median over steps, busiest rank: main-thread CPU time of train_batch
    loss: float | None = None
    error: str | None = None


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU/gloo smoke run: tiny shapes, fp32, few steps")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help=f"comma list of ds-1f1b, ds-dualpipev, {', '.join(OURS)} (ours also as NAME{DYNAMIC} and "
                        "NAME@KEY=VALUE..., KEY a pipeline config key)")
    p.add_argument("--micro-batches", default="8,16", help="comma list of m (gradient_accumulation_steps)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trace-dir", default=None,
                   help="after the timed steps, profile one more step of every contender (torch.profiler, CPU and "
                        "CUDA) into DIR/<contender>_m<m>_rank<r>.json; summarise with bench/trace_summary.py")
    p.add_argument("--json", default=None, help="write the results to this file (rank 0)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="dualmoe engines' pipeline.timeout_s")
    p.add_argument("--hang-s", type=float, default=0.0,
                   help="if one contender runs longer, dump every thread's stack and exit (0: never)")
    p.add_argument("--in-process", action="store_true",
                   help="run the contenders in these processes, one after the other (no fresh process per run)")
    p.add_argument("--child-timeout-s", type=float, default=300.0,
                   help="kill a run's processes after this many seconds (driver mode)")
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)  # a child's result, for its driver
    p.add_argument("--go-file", default=None, help=argparse.SUPPRESS)  # a pre-started child waits for this file
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.hidden, args.seq, args.micro_batch_size = 8, 16, 8, 2
        args.warmup, args.steps = 1, 3
    return args


def _setup(tiny: bool) -> torch.device:
    import deepspeed

    if torch.cuda.is_available() and not tiny:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        # Host threads for the CPU-side model init and data (torchrun sets OMP_NUM_THREADS=1); timing is device-bound.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
        deepspeed.init_distributed(dist_backend="nccl")
        return torch.device("cuda", local_rank)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    return torch.device("cpu")


def _split_contender(contender: str) -> tuple[str, dict[str, Any]]:
    """'zbv:dynamic@timeout_s=60' -> ('zbv', {'static_shapes': False, 'timeout_s': 60})."""
    name, *settings = contender.split("@")
    extra: dict[str, Any] = {}
    if name.endswith(DYNAMIC):
        name, extra["static_shapes"] = name.removesuffix(DYNAMIC), False
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--contenders: {item!r} in {contender!r} is not KEY=VALUE")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return name, extra


def _config(args: argparse.Namespace, m: int, schedule: str | None) -> dict[str, Any]:
    schedule, extra = _split_contender(schedule) if schedule else (schedule, {})
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size, "gradient_accumulation_steps": m,
        "steps_per_print": 10**9, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
        "pipeline": {"partition_method": "uniform", "timeout_s": args.timeout_s} if schedule else {}}
    if not args.tiny:
        cfg["bf16"] = {"enabled": True}
    if schedule:
        cfg["pipeline"]["schedule"] = schedule
        cfg["pipeline"].update(extra)
    return cfg


def _engine(args: argparse.Namespace, contender: str, m: int) -> Any:
    import deepspeed
    import dualmoe
    from deepspeed.pipe import LayerSpec, PipelineModule

    pipe = dist.get_world_size()
    specs = [LayerSpec(MLPBlock, args.hidden) for _ in range(args.layers)]
    common = {"loss_fn": mse, "partition_method": "uniform", "seed_layers": True}
    if contender == "ds-dualpipev":
        from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

        model = DualPipeVModule(specs, num_stages=pipe, **common)
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(args, m, None))[0]
    model = PipelineModule(specs, num_stages=pipe, **common)
    schedule = None if contender == "ds-1f1b" else contender
    return dualmoe.initialize(model=model, model_parameters=model.parameters(), config=_config(args, m, schedule))[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(args: argparse.Namespace, contender: str, m: int, device: torch.device) -> Result:
    pipe = dist.get_world_size()
    result = Result(contender=contender, pipe=pipe, micro_batches=m)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = [(torch.randn(args.micro_batch_size, args.seq, args.hidden, generator=gen).to(device, dtype),
              torch.randn(args.micro_batch_size, args.seq, args.hidden, generator=gen).to(device, dtype))
             for _ in range(m)]
    engine = _engine(args, contender, m)
    reached: list[float] = []
    step_optimizer = engine._take_model_step

    def optimizer_step(*a: Any, **k: Any) -> Any:  # both engines' optimizer step ends train_batch with this
        reached.append(time.perf_counter())
        return step_optimizer(*a, **k)

    engine._take_model_step = optimizer_step
    host, cpu = [], []
    for _ in range(args.warmup):
        engine.train_batch(iter(batch))
    times, peaks, activations = [], [], []
    for _ in range(args.steps):
        dist.barrier()
        _sync(device)
        start_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start, start_cpu = time.perf_counter(), time.thread_time()
        loss = engine.train_batch(iter(batch))
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        host.append((reached[-1] - start) * 1e3)
        _sync(device)
        elapsed = time.perf_counter() - start
        slowest = torch.tensor([elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(float(slowest) * 1e3)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            peaks.append(peak / 2**20)
            activations.append((peak - start_alloc) / 2**20)
    if args.trace_dir:
        _profile_step(args, engine, batch, device, re.sub(r"[^A-Za-z0-9_.-]", "-", contender) + f"_m{m}")
    result.step_ms, result.loss = times, float(loss)
    result.median_ms, result.mean_ms = statistics.median(times), statistics.fmean(times)
    spans = torch.tensor([statistics.median(host), statistics.median(cpu)], dtype=torch.float64, device=device)
    dist.all_reduce(spans, op=dist.ReduceOp.MAX)
    result.host_to_optimizer_ms, result.host_cpu_ms = round(float(spans[0]), 2), round(float(spans[1]), 2)
    gathered: list[Any] = [None] * pipe
    dist.all_gather_object(gathered, (max(peaks, default=0.0), max(activations, default=0.0)))
    result.peak_mb = [round(p, 1) for p, _ in gathered]
    result.activation_peak_mb = [round(a, 1) for _, a in gathered]
    del engine, batch
    return result


def _profile_step(args: argparse.Namespace, engine: Any, batch: list[Any], device: torch.device, name: str) -> None:
    """One more (untimed) step under torch.profiler, exported as a chrome trace per rank."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    dist.barrier()
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        engine.train_batch(iter(batch))
        _sync(device)
    os.makedirs(args.trace_dir, exist_ok=True)
    prof.export_chrome_trace(os.path.join(args.trace_dir, f"{name}_rank{dist.get_rank()}.json"))


def _table(results: list[Result]) -> str:
    base = {r.micro_batches: r.median_ms for r in results if r.contender == "ds-1f1b" and r.median_ms}
    width = max([14] + [len(r.contender) + 1 for r in results])
    lines = [f"{'contender':<{width}}{'P':>3}{'m':>4}{'median ms':>11}{'vs ds-1f1b':>11}{'host ms':>9}{'cpu ms':>8}  "
             f"{'peak MB/rank':<28}{'act. peak MB/rank':<28}"]
    for r in results:
        if r.error:
            error = r.error.splitlines()[-1][:80]
            lines.append(f"{r.contender:<{width}}{r.pipe:>3}{r.micro_batches:>4}  FAILED: {error}")
            continue
        speedup = f"{base[r.micro_batches] / r.median_ms:.3f}x" if r.micro_batches in base else "-"
        host = f"{r.host_to_optimizer_ms:>9.1f}{r.host_cpu_ms:>8.1f}" if r.host_cpu_ms is not None else " " * 17
        lines.append(f"{r.contender:<{width}}{r.pipe:>3}{r.micro_batches:>4}{r.median_ms:>11.2f}{speedup:>11}{host}  "
                     f"{','.join(f'{p:.0f}' for p in r.peak_mb):<28}"
                     f"{','.join(f'{a:.0f}' for a in r.activation_peak_mb):<28}")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write(args: argparse.Namespace, device_name: str, results: list[Result]) -> None:
    meta = {"device": device_name, "world_size": dist.get_world_size(), "torch": torch.__version__,
            "deepspeed": __import__("deepspeed").__version__, "args": vars(args)}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)


def _wait_for_go(path: str, timeout_s: float) -> None:
    """A pre-started child: import the heavy modules now, then wait for the driver's go (no device touched)."""
    import deepspeed
    import deepspeed.pipe  # noqa: F401
    import dualmoe  # noqa: F401

    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"no go from the driver within {timeout_s:.0f} s")
        time.sleep(0.02)


def _in_process(args: argparse.Namespace) -> int:
    """Run every contender at every m in this process; rank 0 prints each result, the table and the JSON."""
    if args.go_file:
        _wait_for_go(args.go_file, 4 * args.child_timeout_s)
    device = _setup(args.tiny)
    results = []
    # Contender-major order, so a contender that hangs (and trips --hang-s) costs only its own rows.
    for contender in args.contenders.split(","):
        for m in (int(x) for x in args.micro_batches.split(",")):
            if args.hang_s > 0:
                faulthandler.dump_traceback_later(args.hang_s, exit=True)
            try:
                results.append(_measure(args, contender, m, device))
            except Exception:  # a contender that cannot run this layout (e.g. m < 2P) is reported, not fatal
                results.append(Result(contender=contender, pipe=dist.get_world_size(), micro_batches=m,
                                      error=traceback.format_exc()))
            faulthandler.cancel_dump_traceback_later()
            if dist.get_rank() == 0:
                sys.stdout.write(_table(results[-1:]).splitlines()[-1] + "\n")
                sys.stdout.flush()
                if args.json:
                    _write(args, _device_name(device), results)
                if args.result_file:
                    with open(args.result_file, "w") as f:
                        json.dump({"device": _device_name(device), "results": [asdict(r) for r in results]}, f)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if dist.get_rank() == 0 and len(results) > 1:
        sys.stdout.write(_table(results) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _child_argv(args: argparse.Namespace, contender: str, m: int, files: tuple[str, str]) -> list[str]:
    argv = ["--in-process", "--contenders", contender, "--micro-batches", str(m), "--layers", str(args.layers),
            "--hidden", str(args.hidden), "--seq", str(args.seq), "--micro-batch-size", str(args.micro_batch_size),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--timeout-s", str(args.timeout_s),
            "--hang-s", str(args.hang_s), "--child-timeout-s", str(args.child_timeout_s),
            "--result-file", files[0], "--go-file", files[1]]
    if args.tiny:
        argv.append("--tiny")
    if args.trace_dir:
        argv += ["--trace-dir", args.trace_dir]
    return argv


def _drive(args: argparse.Namespace) -> int:
    """Run each (contender, m) in fresh processes, one child per rank; rank 0 collects, prints and writes.

    Run i+1's children start while run i measures, import torch and DeepSpeed, and wait for their go file
    (no device work before it), so only the device and process-group set-up is paid between runs.
    """
    dist.init_process_group("gloo")  # the torchrun rendezvous; this process never touches the device
    rank, world = dist.get_rank(), dist.get_world_size()
    runs = [(contender, int(m)) for contender in args.contenders.split(",") for m in args.micro_batches.split(",")]
    results: list[Result] = []
    device_name = "?"
    children: dict[int, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="dualmoe-bench-") as tmp:
        files = [(os.path.join(tmp, f"run{i}.json"), os.path.join(tmp, f"run{i}.go")) for i in range(len(runs))]

        def start(i: int) -> None:
            port = [_free_port() if rank == 0 else 0]
            dist.broadcast_object_list(port, src=0)
            env = dict(os.environ, MASTER_PORT=str(port[0]))
            env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the children's rank 0 hosts their own store
            cmd = [sys.executable, os.path.abspath(__file__), *_child_argv(args, *runs[i], files[i])]
            children[i] = subprocess.Popen(cmd, env=env)

        try:
            start(0)
            for i, (contender, m) in enumerate(runs):
                began = time.monotonic()
                open(files[i][1], "w").close()  # go
                if i + 1 < len(runs):
                    start(i + 1)
                try:
                    status: Any = children[i].wait(timeout=args.child_timeout_s)
                except subprocess.TimeoutExpired:
                    children[i].kill()
                    children[i].wait()
                    status = f"killed after {args.child_timeout_s:.0f} s"
                del children[i]
                statuses: list[Any] = [None] * world
                dist.all_gather_object(statuses, status)
                if rank == 0:
                    if os.path.exists(files[i][0]):
                        with open(files[i][0]) as f:
                            record = json.load(f)
                        device_name = record["device"]
                        results += [Result(**r) for r in record["results"]]
                    else:
                        results.append(Result(contender=contender, pipe=world, micro_batches=m,
                                              error=f"no result; exit status per rank: {statuses}"))
                    sys.stdout.write(f"[run {i + 1}/{len(runs)}: {time.monotonic() - began:.0f} s] "
                                     + _table(results[-1:]).splitlines()[-1] + "\n")
                    sys.stdout.flush()
                    if args.json:
                        _write(args, device_name, results)
                dist.barrier()
        finally:
            for child in children.values():
                child.kill()
                child.wait()
    if rank == 0:
        sys.stdout.write(_table(results) + "\n")
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Drive fresh processes per (contender, m), or with `--in-process` run them here."""
    args = _args(argv)
    return _in_process(args) if args.in_process else _drive(args)


if __name__ == "__main__":
    sys.exit(main())
