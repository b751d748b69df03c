"""CPU benchmark of the EPLB planner (`dualmoe.moe.eplb`) against deepseek-ai/EPLB run side by side.

    python bench/eplb.py --ref-dir /work/ext/EPLB --json eplb.json --png eplb.png

The reference is imported from ``--ref-dir`` (a folder holding deepseek-ai/EPLB's ``eplb.py``, kept
outside this repository, e.g. ``git show d52c72d:eplb.py > /work/ext/EPLB/eplb.py``); without it the
reference columns are left empty and a note says so. Everything runs on one CPU thread.

Loads (DeepSeek-V3 shape): 58 MoE layers x 256 experts; per layer a Zipf(s) popularity over a random
permutation of the experts, then a multinomial draw of 65,536 tokens x top-8. Windows:
* plan: the window the plan is made from;
* next: a fresh draw from the same popularity (sampling noise only);
* drift: a fresh draw from a popularity moved by ``--drift`` (default 5 %): (1 - d) p + d q, q a Zipf over
  a new random permutation.
Metrics: plan time (min over repeats, wall clock), balancedness (sum over layers of mean GPU load / sum
of max GPU load, an expert's load split evenly over its replicas) on each window, duplicate replicas on
one GPU, and expert copies per rebalance after the drift: a fresh plan (as is, and relabelled onto the
deployed one) versus ``plan_placement`` (migration-aware, default settings), as a share of all slots.

``--homes`` adds the home-aware table (no reference needed): remote slots per rank (slots whose expert's
trainable weights live on another EP rank, e // (E/G)) with ``remote_cost`` 0 and the Rebalancer's
default 0.05 (``copy_cost`` 1e-4 as the Rebalancer), planned from the identity placement (home blocks,
then replicas of the next rank's experts) and from the previous plan after the drift, at the EP=4
benchmark shape (64 experts, 80 slots, 4 ranks, 1 node) and at DeepSeek-V3 shape.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from dualmoe.moe.eplb import gpu_load, home_ranks, plan_placement, rebalance_experts, remote_slots
from dualmoe.moe.eplb_migrate import relabel
from dualmoe.moe.placement import Placement
from tqdm import tqdm

NUM_LAYERS, NUM_EXPERTS, TOKENS, TOP_K = 58, 256, 65536, 8


@dataclass(frozen=True)
class Shape:
    """One placement problem: slots, expert groups, nodes, GPUs (policy follows the reference's rule)."""

    slots: int
    groups: int
    nodes: int
    gpus: int

    @property
    def policy(self) -> str:
        return "hierarchical" if self.groups % self.nodes == 0 and self.nodes > 1 else "global"

    @property
    def name(self) -> str:
        return f"{self.policy[:4]} P={self.slots} G={self.gpus}" + (f" N={self.nodes}" if self.nodes > 1 else "")


SHAPES = [
    Shape(288, 8, 4, 32), Shape(320, 8, 4, 32),  # DeepSeek-V3 prefill: hierarchical, 4 nodes
    Shape(288, 1, 1, 32), Shape(320, 1, 1, 32),  # the same with the global policy
    Shape(320, 8, 8, 64), Shape(320, 1, 1, 64),  # 64 GPUs, 5 slots each
    Shape(288, 1, 1, 144),  # 144 GPUs, 2 slots each (decode-like)
]


@dataclass
class Row:
    """Results of one (shape, skew)."""

    shape: str
    policy: str
    slots: int
    gpus: int
    nodes: int
    skew: float
    ours_ms: float  # min wall clock
    ours_cpu_ms: float  # min CPU time (robust to other processes on the machine)
    ref_ms: float | None = None
    ref_cpu_ms: float | None = None
    ours_bal: dict[str, float] = field(default_factory=dict)  # window -> balancedness
    ref_bal: dict[str, float] = field(default_factory=dict)
    ours_dup: int = 0
    ref_dup: int | None = None
    copies: dict[str, float] = field(default_factory=dict)  # share of slots copied after the drift
    drift_bal: dict[str, float] = field(default_factory=dict)  # balancedness on the drift window per plan kind
    plan_placement_ms: float = 0.0
    plan_placement_cpu_ms: float = 0.0


def popularity(gen: torch.Generator, skew: float) -> torch.Tensor:
    """[L, E] Zipf(skew) popularity over a random permutation of the experts of every layer."""
    base = 1.0 / torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** skew
    rows = [base[torch.randperm(NUM_EXPERTS, generator=gen)] for _ in range(NUM_LAYERS)]
    out = torch.stack(rows)
    return out / out.sum(-1, keepdim=True)


def draw(gen: torch.Generator, prob_LE: torch.Tensor) -> torch.Tensor:
    """[L, E] token counts of one window (TOKENS x TOP_K assignments per layer)."""
    draws = torch.multinomial(prob_LE, TOKENS * TOP_K, replacement=True, generator=gen)
    counts = torch.zeros_like(prob_LE)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def overall(placement_LS: torch.Tensor, load_LE: torch.Tensor, gpus: int) -> float:
    load_LG = gpu_load(placement_LS, load_LE, gpus)
    return float(load_LG.mean(-1).sum() / load_LG.max(-1).values.sum())


def duplicates(placement_LS: torch.Tensor, gpus: int) -> int:
    """Slots holding a second replica of an expert already on the same GPU."""
    per_gpu = placement_LS.view(-1, placement_LS.shape[1] // gpus).sort(-1).values
    return int((per_gpu[:, 1:] == per_gpu[:, :-1]).sum())


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(min wall ms, min CPU ms of this process, last result) over ``repeats`` calls."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall * 1e3, cpu * 1e3, out


def load_reference(ref_dir: str | None):
    """The reference module from ``ref_dir/eplb.py``, or None."""
    if not ref_dir or not (Path(ref_dir) / "eplb.py").is_file():
        return None
    spec = importlib.util.spec_from_file_location("reference_eplb", Path(ref_dir) / "eplb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(shape: Shape, skew: float, windows: dict[str, torch.Tensor], ref, repeats: int,
             ref_repeats: int, copy_cost: float, max_moves_frac: float) -> Row:
    plan_w = windows["plan"]
    args = (shape.slots, shape.groups, shape.nodes, shape.gpus)
    ours_ms, ours_cpu, ours = timed(lambda: rebalance_experts(plan_w, *args)[0], repeats)
    row = Row(shape.name, shape.policy, shape.slots, shape.gpus, shape.nodes, skew, ours_ms, ours_cpu)
    row.ours_bal = {k: overall(ours, v, shape.gpus) for k, v in windows.items()}
    row.ours_dup = duplicates(ours, shape.gpus)
    fresh = rebalance_experts(windows["drift"], *args)[0]
    kwargs = dict(num_slots=shape.slots, num_nodes=shape.nodes, num_ranks=shape.gpus, num_groups=shape.groups)
    row.plan_placement_ms, row.plan_placement_cpu_ms, plan = timed(
        lambda: plan_placement(windows["drift"], ours, copy_cost=copy_cost, **kwargs), repeats)
    budget = int(max_moves_frac * shape.slots)
    budgeted = plan_placement(windows["drift"], ours, copy_cost=copy_cost, max_moves=budget, **kwargs)
    total = ours.numel()
    row.copies = {
        "fresh": int((fresh != ours).sum()) / total,
        "fresh_relabelled": int((relabel(fresh, ours, num_gpus=shape.gpus,
                                         num_nodes=shape.nodes if shape.policy == "hierarchical" else 1) != ours).sum())
        / total,
        "migration_aware": plan.num_copies / total,
        "migration_aware_budget": budgeted.num_copies / total,
    }
    row.drift_bal = {"deployed": overall(ours, windows["drift"], shape.gpus),
                     "fresh": overall(fresh, windows["drift"], shape.gpus),
                     "migration_aware": overall(plan.physical_to_logical, windows["drift"], shape.gpus),
                     "migration_aware_budget": overall(budgeted.physical_to_logical, windows["drift"], shape.gpus)}
    if ref is not None:
        row.ref_ms, row.ref_cpu_ms, theirs = timed(lambda: ref.rebalance_experts(plan_w, *args)[0], ref_repeats)
        row.ref_bal = {k: overall(theirs, v, shape.gpus) for k, v in windows.items()}
        row.ref_dup = duplicates(theirs, shape.gpus)
        ref_fresh = ref.rebalance_experts(windows["drift"], *args)[0]
        row.copies["reference_fresh"] = int((ref_fresh != theirs).sum()) / total
    return row


HOME_SHAPES = [  # (name, experts, shape)
    ("EP=4 E=64", 64, Shape(80, 1, 1, 4)),
    ("DSV3 hier", NUM_EXPERTS, Shape(288, 8, 4, 32)),
    ("DSV3 glob", NUM_EXPERTS, Shape(288, 1, 1, 32)),
]


def home_rows(skew: float, seed: int, drift: float, remote_costs: tuple[float, ...] = (0.0, 0.05)) -> list[dict]:
    """Remote slots per rank with and without ``remote_cost`` (see the module docstring)."""
    out = []
    for name, experts, shape in HOME_SHAPES:
        gen = torch.Generator().manual_seed(seed)
        base = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
        prob = torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(NUM_LAYERS)])
        prob = prob / prob.sum(-1, keepdim=True)
        moved = torch.stack([base[torch.randperm(experts, generator=gen)] for _ in range(NUM_LAYERS)])
        moved = (1 - drift) * prob + drift * moved / moved.sum(-1, keepdim=True)
        plan_w, drift_w = draw(gen, prob), draw(gen, moved)
        home = home_ranks(experts, shape.gpus)
        ident = Placement.identity(experts, shape.slots, num_ranks=shape.gpus).physical_to_logical
        kwargs = dict(num_slots=shape.slots, num_nodes=shape.nodes, num_ranks=shape.gpus, num_groups=shape.groups,
                      copy_cost=1e-4, home_of=home)
        starts = {"identity": (torch.tensor(ident).expand(NUM_LAYERS, -1).contiguous(), plan_w)}
        previous = plan_placement(plan_w, starts["identity"][0], remote_cost=0.0, **kwargs).physical_to_logical
        starts["previous plan, drift"] = (previous, drift_w)
        for start, (current, load) in starts.items():
            for remote_cost in remote_costs:
                start_s = time.perf_counter()
                plan = plan_placement(load, current, remote_cost=remote_cost, **kwargs)
                ms = (time.perf_counter() - start_s) * 1e3
                new = plan.physical_to_logical
                out.append({"shape": name, "start": start, "remote_cost": remote_cost, "ms": ms,
                            "remote_per_rank": _per_rank(new, home, shape.gpus),
                            "remote_before": _per_rank(current, home, shape.gpus),
                            "least": (shape.slots - experts) / shape.gpus,
                            "balancedness": overall(new, load, shape.gpus),
                            "copies_per_layer": plan.num_copies / NUM_LAYERS})
    return out


def _per_rank(placement_LS: torch.Tensor, home_E: torch.Tensor, gpus: int) -> float:
    return float(remote_slots(placement_LS, home_E, gpus).double().mean()) / gpus


def print_home_table(rows: list[dict], skew: float) -> None:
    print(f"\nHome awareness (Zipf {skew}, {NUM_LAYERS} layers, copy_cost 1e-4): remote slots per rank")
    print("| shape | planned from | remote_cost | remote/rank before | remote/rank after (least) | balancedness "
          "| copies/layer | plan ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['start']} | {r['remote_cost']} | {r['remote_before']:.2f} | "
              f"{r['remote_per_rank']:.2f} ({r['least']:.0f}) | {r['balancedness']:.4f} | "
              f"{r['copies_per_layer']:.1f} | {r['ms']:.0f} |")


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (f"{model}, {torch.get_num_threads()} torch thread, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def print_table(rows: list[Row]) -> None:
    """Markdown tables: speed and quality, then migration."""
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    print("| shape | s | ours ms (cpu) | ref ms (cpu) | plan bal ours / ref | next ours / ref | drift ours / ref "
          "| dup ours / ref |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.shape} | {r.skew} | {r.ours_ms:.1f} ({r.ours_cpu_ms:.1f}) | {num(r.ref_ms, '.0f')} "
              f"({num(r.ref_cpu_ms, '.0f')}) | "
              + " | ".join(f"{r.ours_bal[k]:.4f} / {num(r.ref_bal.get(k), '.4f')}" for k in ("plan", "next", "drift"))
              + f" | {r.ours_dup} / {num(r.ref_dup, 'd')} |")
    print()
    print("| shape | s | plan_placement ms (cpu) | copies ref fresh / fresh / relabelled / migr. / migr. budget "
          "| drift bal deployed / fresh / migr. / migr. budget |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        c, b = r.copies, r.drift_bal
        print(f"| {r.shape} | {r.skew} | {r.plan_placement_ms:.1f} ({r.plan_placement_cpu_ms:.1f}) | "
              f"{num(c.get('reference_fresh'), '.3f')} / {c['fresh']:.3f} / {c['fresh_relabelled']:.3f} / "
              f"{c['migration_aware']:.3f} / {c['migration_aware_budget']:.3f} | {b['deployed']:.4f} / "
              f"{b['fresh']:.4f} / {b['migration_aware']:.4f} / {b['migration_aware_budget']:.4f} |")


def plot(rows: list[Row], path: str, has_ref: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.shape}\ns={r.skew}" for r in rows]
    x = torch.arange(len(rows)).tolist()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, len(rows) * 0.6), 8), sharex=True)
    ax1.bar([i - 0.2 for i in x], [r.ours_bal["plan"] for r in rows], 0.4, label="dualmoe")
    if has_ref:
        ax1.bar([i + 0.2 for i in x], [r.ref_bal["plan"] for r in rows], 0.4, label="deepseek-ai/EPLB")
    lowest = min([r.ours_bal["plan"] for r in rows] + [r.ref_bal["plan"] for r in rows if has_ref])
    ax1.set_ylim(max(0.0, lowest - 0.05), 1.005)
    ax1.set_ylabel("balancedness (plan window)")
    ax1.legend()
    ax2.bar([i - 0.2 for i in x], [r.ours_ms for r in rows], 0.4, label="dualmoe")
    if has_ref:
        ax2.bar([i + 0.2 for i in x], [r.ref_ms for r in rows], 0.4, label="deepseek-ai/EPLB")
    ax2.set_yscale("log")
    ax2.set_ylabel("plan time, ms (1 CPU thread)")
    ax2.set_xticks(x, labels, rotation=90, fontsize=7)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-dir", default="/work/ext/EPLB", help="folder with deepseek-ai/EPLB eplb.py")
    parser.add_argument("--skews", type=float, nargs="+", default=[0.3, 0.6, 1.0])
    parser.add_argument("--drift", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5, help="plan-time repeats (min is reported)")
    parser.add_argument("--ref-repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the 32-GPU shapes and one skew")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-cost", type=float, default=0.1, help="plan_placement copy_cost")
    parser.add_argument("--max-moves-frac", type=float, default=0.15,
                        help="budgeted migration-aware run: max_moves = this share of the slots per layer")
    parser.add_argument("--homes", action="store_true", help="also the home-aware table (remote slots per rank)")
    parser.add_argument("--homes-only", action="store_true", help="only the home-aware table")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="draw balancedness and plan time here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ref = load_reference(args.ref_dir)
    if ref is None:
        print(f"note: no reference eplb.py under {args.ref_dir!r}; reference columns left empty", file=sys.stderr)
    shapes = SHAPES[:4] if args.quick else SHAPES
    skews = args.skews[:1] if args.quick else args.skews
    if args.homes_only:
        homes = home_rows(0.6, args.seed, args.drift)
        print(f"machine: {machine()}; date: {datetime.date.today().isoformat()}")
        print_home_table(homes, 0.6)
        if args.json:
            Path(args.json).write_text(json.dumps({"homes": homes}, indent=1))
        return 0
    cases = [(skew, shape) for skew in skews for shape in shapes]
    rows = []
    windows_by_skew: dict[float, dict[str, torch.Tensor]] = {}
    for skew, shape in tqdm(cases, desc="eplb", disable=not sys.stderr.isatty()):
        if skew not in windows_by_skew:
            gen = torch.Generator().manual_seed(args.seed)
            prob = popularity(gen, skew)
            moved = (1 - args.drift) * prob + args.drift * popularity(gen, skew)
            windows_by_skew[skew] = {"plan": draw(gen, prob), "next": draw(gen, prob), "drift": draw(gen, moved)}
        rows.append(run_case(shape, skew, windows_by_skew[skew], ref, args.repeats, args.ref_repeats,
                             args.copy_cost, args.max_moves_frac))
    print(f"machine: {machine()}; date: {datetime.date.today().isoformat()}")
    print_table(rows)
    homes = home_rows(0.6, args.seed, args.drift) if args.homes else []
    if homes:
        print_home_table(homes, 0.6)
    if args.json:
        meta = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "reference": None if ref is None else args.ref_dir, "drift": args.drift, "seed": args.seed,
                "tokens": TOKENS, "top_k": TOP_K, "layers": NUM_LAYERS, "experts": NUM_EXPERTS}
        results = {"meta": meta, "rows": [asdict(r) for r in rows], "homes": homes}
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.png:
        plot(rows, args.png, ref is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
