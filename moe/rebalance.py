"""EPLB rebalancing during training: plan from load statistics, migrate slot weights, switch together.

Legend: L MoE layers, E logical experts, S physical slots, P expert-parallel (EP) ranks, C slot copies.

Every `eplb.interval` optimizer steps, at the step boundary (after the optimizer step, the router-bias
update and the slot refresh of `dualmoe.moe.hooks.end_step`):

    load_LE (window or EMA; identical on every rank)  --plan_placement-->  Plan           [pure, timed]
    debug: all-gather of the plan digest over the agreement group; any mismatch aborts on every rank
    plan_copies(old, new)   every changed slot gets its new expert's weights from the expert's home rank
    chunk_copies            rounds in which no rank sends or receives more than `chunk_bytes`
    each round              pack rows of the home parameters -> batch_isend_irecv over the EP group ->
                            unpack into STAGING buffers (the new slot contents; live slots untouched)
    agree                   each rank posts ok / failed; one decision (commit or abort) is set once
    commit                  staging -> slot buffers and the new placement maps (local, cannot half-fail)

Only weights move. Under the home design (`dualmoe.moe.experts`) every logical expert's trainable
parameters, gradients and optimizer state live on a fixed home rank, e // (E/P); slots are buffers
refreshed from the homes. A new placement only changes which slot copies which home, so a rebalance
rewrites slot buffers and maps and never touches a parameter, a `.grad` or optimizer state (the tests
check that optimizer state is bitwise unchanged and still attached to the same tensors). This is the
SwiftMoE/Symi recipe of the research notes: a moved expert costs its weights only (bf16 88 MB for a
DeepSeek-V3 expert), not the ~0.6 GB of fp32 Adam state that moving the owner would.

Failure. The switch is all or nothing: a local error on any rank, or a late rank, makes every rank keep
its old maps and slots (one decision through the store; `dualmoe.moe.migration` says how); the rank logs a
warning and counts it in `num_failed`. A communication error raises `CommTimeout` with the old placement
still in place.

The stall (planning + digest check + transfers + agreement + commit, wall time on each rank) is in
every `RebalanceReport`, summed in `Rebalancer.stall_s`, and written to the monitor as
`<prefix>/eplb/stall_ms` with balancedness before/after and the copies made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dualmoe.errors import ConfigError
from dualmoe.log import log_rank0
from torch import Tensor
from torch.profiler import record_function

from .config import EplbConfig
from .eplb import Plan, gpu_load, home_ranks, plan_placement
from .layer import MoELayer
from .migration import FaultHook, SlotMigration, global_rank, make_agreement, slot_copy_bytes
from .rebalance_plan import SlotCopy, chunk_copies, plan_copies, plan_digest
from .stats import LoadStats

__all__ = [
    "RebalanceReport",
    "Rebalancer",
    "SlotCopy",
    "attach_rebalancer",
    "chunk_copies",
    "plan_copies",
    "plan_digest",
]

logger = logging.getLogger(__name__)


# ---- reports -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class RebalanceReport:
    """What one rebalance did on this rank (times in seconds, wall clock)."""

    step: int
    """Optimizer step at which it ran (-1 when `apply` was called directly)."""
    applied: bool
    """True when every rank switched to the new placement."""
    status: str
    """"applied", "skipped: <why>" or "failed: <why>" (the same decision on every rank)."""
    num_copies: int
    """Slot copies of the plan, all ranks together."""
    num_remote_copies: int
    """Of those, copies that cross ranks (the rest are local copies from a home on the same rank)."""
    bytes_sent: int
    """Bytes this rank sent."""
    bytes_received: int
    """Bytes this rank received."""
    num_rounds: int
    """Transfer rounds (`chunk_copies`)."""
    balancedness_before: float
    """sum_l mean / sum_l max GPU load of the deployed placement on the planning load."""
    balancedness_after: float
    """The same for the plan (equal to before when not applied)."""
    plan_s: float
    """Planning time (`plan_placement`), 0 when the plan came from outside."""
    migrate_s: float
    """Digest check, transfer rounds and staging."""
    agree_s: float
    """Waiting for the decision."""
    commit_s: float
    """Writing the staged rows into the slot buffers and swapping the maps."""

    @property
    def stall_s(self) -> float:
        """Everything the step waited for: plan + migrate + agree + commit."""
        return self.plan_s + self.migrate_s + self.agree_s + self.commit_s


class Rebalancer:
    """Periodic EPLB re-placement of the slots of a model's (or pipeline stage's) MoE layers.

    Constructing it is collective over the agreement group (it agrees on a store key prefix).

    Args:
        layers: the MoE layers in model order (the L axis of `stats`), all with one EP group.
        stats: their load statistics (identical on every rank after `LoadStats.step`).
        config: the `moe.eplb` settings; default the first layer's.
        num_groups: expert groups for the hierarchical policy; default the router's `n_group`.
        group: the agreement group: every rank running these layers (default the layers' stats group,
            else the default group).
        chunk_bytes: bound on the bytes one rank sends, and receives, per transfer round.
        timeout_s: deadline of each transfer round.
        agree_timeout_s: how long a rank waits for the others' votes (default `timeout_s`).
        debug: all-gather plan digests before migrating (one extra collective per rebalance).
        monitor: DeepSpeed's `engine.monitor` (events are written on global rank 0 when it is enabled).
        copy_cost: the planner's migration price (`plan_placement`); default `config.copy_cost`.
        remote_cost: the planner's balancedness price of holding every slot of a layer off its expert's home
            rank (`plan_placement`'s `remote_cost`; homes are the block layout e // (E/P)); 0 ignores homes;
            "auto" derives it from the planning load at each plan (`remote_price`); default
            `config.remote_cost`.
        name: distinguishes rebalancers that share a store (e.g. one per pipeline stage).
        fault_hook: test seam, see `FaultHook`.
    """

    def __init__(self, layers: Sequence[MoELayer], *, stats: LoadStats | None, config: EplbConfig | None = None,
                 num_groups: int | None = None, group: dist.ProcessGroup | None = None,
                 chunk_bytes: int = 256 << 20, timeout_s: float = 300.0, agree_timeout_s: float | None = None,
                 debug: bool = False, monitor: Any = None,
                 copy_cost: float | None = None, remote_cost: float | str | None = None, name: str = "moe",
                 fault_hook: FaultHook | None = None) -> None:
        if not layers:
            raise ConfigError("Rebalancer needs at least one MoE layer")
        first = layers[0]
        shapes = {(m.num_experts, m.placement.num_slots, m.ep_size) for m in layers}
        if len(shapes) != 1:
            raise ConfigError(f"all layers of one Rebalancer need the same (num_experts, num_slots, ep_size); got "
                              f"{sorted(shapes)}")
        if any(m.ep_group is not first.ep_group for m in layers):
            raise ConfigError("all layers of one Rebalancer must share one expert-parallel group")
        dtypes = {t.dtype for m in layers for t in (m.experts.slot_gate_up, m.experts.slot_down)}
        if len(dtypes) != 1:
            raise ConfigError(f"slot buffers of all layers must share one dtype for batched transfers; got {dtypes}")
        if chunk_bytes < 1:
            raise ConfigError(f"chunk_bytes={chunk_bytes}: must be >= 1")
        self.layers = list(layers)
        self.stats = stats
        self.config = config if config is not None else first.config.eplb
        self.num_groups = first.config.router.n_group if num_groups is None else num_groups
        self.num_experts, self.num_slots, self.ep_size = shapes.pop()
        self.ep_group, self.ep_rank = first.ep_group, first.ep_rank
        self.group = group if group is not None else first.stats_group
        self.chunk_bytes, self.timeout_s, self.debug = chunk_bytes, timeout_s, debug
        self.agree_timeout_s = timeout_s if agree_timeout_s is None else agree_timeout_s
        self.monitor, self.fault_hook = monitor, fault_hook
        self.copy_cost = self.config.copy_cost if copy_cost is None else copy_cost
        self.remote_cost = self.config.remote_cost if remote_cost is None else remote_cost
        if self.remote_cost != "auto" and not (isinstance(self.remote_cost, (int, float)) and self.remote_cost >= 0):
            raise ConfigError(f"remote_cost={self.remote_cost!r}: must be a number >= 0 or \"auto\"")
        self._device = first.experts.gate_up_proj.device
        self.num_applied = self.num_failed = self.num_skipped = 0
        self.stall_s = 0.0
        self.last_report: RebalanceReport | None = None
        self.last_remote_cost: float | None = None  # the remote_cost of the last plan ("auto" resolved)
        self._round = 0
        self._agreement = make_agreement(self.group, name=name, device=self._device)

    # ---- planning (pure) ----------------------------------------------------------------------------
    def current_maps(self) -> Tensor:
        """[L, S] int64 deployed physical->logical maps (CPU)."""
        return torch.tensor([m.placement.physical_to_logical for m in self.layers], dtype=torch.int64)

    def planning_load(self) -> Tensor:
        """[L, E] load the planner sees: the EMA if `eplb.ema` is set, else the window sum."""
        if self.stats is None:
            raise ConfigError("this Rebalancer has no LoadStats; pass stats= or plan from an explicit load")
        return (self.stats.ema_LE if self.config.ema is not None else self.stats.window_load()).cpu()

    def remote_price(self, load_LE: Tensor) -> float:
        """The `remote_cost` the planner uses for `load_LE` (a window sum or EMA from this Rebalancer's stats).

        A number is used as it is. "auto" prices a remote slot like the expert compute of
        `eplb.remote_slot_rows` routed rows. The slowest rank computes rows / b rows per step (rows: the
        mean per EP rank and step, b: balancedness), so near b = 1 a gain db saves about rows * db rows,
        and one remote slot is worth db = remote_slot_rows / rows; the objective charges remote_cost / S
        per remote slot, hence remote_cost = S * remote_slot_rows / rows. More tokens per step (bigger
        batches, gradient accumulation) make remote replicas cheaper; a step of few tokens keeps experts
        at home.
        """
        if self.remote_cost != "auto":
            return float(self.remote_cost)
        steps = 1
        if self.config.ema is None and self.stats is not None:
            steps = max(1, min(self.stats.num_steps, self.stats.window))
        rows = float(load_LE.sum()) / (max(1, load_LE.shape[0]) * steps * self.ep_size)
        return self.num_slots * self.config.remote_slot_rows / rows if rows > 0 else 0.0

    def plan(self, load_LE: Tensor | None = None) -> Plan:
        """`plan_placement` against the deployed maps with the configured policy, budget and skip rule."""
        load = self.planning_load() if load_LE is None else load_LE
        self.last_remote_cost = self.remote_price(load)
        groups, nodes = self.num_groups, self.config.num_nodes
        if self.config.policy == "global" or (self.config.policy == "auto" and groups % nodes):
            groups = nodes = 1
        # The planner works on small CPU tensors, where intra-op threads cost more than they give (measured
        # on 58 x 256, 288 slots, 32 ranks: 0.2 s on one thread, 1-7 s on two threads of a busy 2-core host).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return plan_placement(load, self.current_maps(), num_slots=self.num_slots, num_nodes=nodes,
                                  num_ranks=self.ep_size, num_groups=groups, max_moves=self.config.max_moves,
                                  min_gain=self.config.min_gain, copy_cost=self.copy_cost,
                                  home_of=home_ranks(self.num_experts, self.ep_size),
                                  remote_cost=self.last_remote_cost)
        finally:
            torch.set_num_threads(threads)

    # ---- the step-boundary entry point ------------------------------------------------------------
    def step(self, step: int, *, monitor_step: int | None = None) -> RebalanceReport | None:
        """Rebalance when `eplb.enabled` and `step` is a multiple of `eplb.interval` (after >= 1 step of stats).

        Call on every rank after the optimizer step and `end_step` (slot refresh, statistics).

        Returns:
            The report, or None when no rebalance was due.
        """
        if not self.config.enabled or step <= 0 or step % self.config.interval:
            return None
        if self.stats is None or self.stats.num_steps == 0:
            return None
        start = time.perf_counter()
        with record_function("dualmoe/moe/eplb_plan"):
            load = self.planning_load()
            plan = self.plan(load)
        plan_s = time.perf_counter() - start
        report = self.apply(plan, load_LE=load, step=step, plan_s=plan_s)
        self.write_events(report, step if monitor_step is None else monitor_step)
        return report

    def apply(self, plan: Plan, *, load_LE: Tensor | None = None, step: int = -1,
              plan_s: float = 0.0) -> RebalanceReport:
        """Execute `plan` (collective over the EP and agreement groups): migrate, agree, switch or keep.

        Args:
            plan: from `plan()` / `plan_placement` against `current_maps()`, identical on every rank.
            load_LE: the load the plan was made for (only for the balancedness in the report).
            step, plan_s: recorded in the report.

        Returns:
            The report (`applied` is the same on every rank).

        Raises:
            CommTimeout: a transfer failed or ran past `timeout_s`; the old placement stays in place, the
                process group is unusable.
        """
        self._round += 1
        start = time.perf_counter()
        old_LS = self.current_maps()
        new_LS = plan.physical_to_logical.to(torch.int64).cpu()
        before, after = self._balancedness(old_LS, new_LS, plan, load_LE)
        ok, reason = True, ""
        if self.debug and not self._digests_agree(new_LS):
            ok, reason = False, "plan digests differ across ranks (statistics or planner not deterministic)"
        copies = plan_copies(old_LS, new_LS, num_experts=self.num_experts, num_ranks=self.ep_size) if ok else ()
        base = {"step": step, "num_copies": len(copies), "num_remote_copies": sum(not c.is_local for c in copies),
                "balancedness_before": before, "plan_s": plan_s}
        if ok and not copies:
            self.num_skipped += 1
            report = RebalanceReport(applied=False, status="skipped: the plan keeps every slot", bytes_sent=0,
                                     bytes_received=0, num_rounds=0, balancedness_after=before,
                                     migrate_s=time.perf_counter() - start, agree_s=0.0, commit_s=0.0, **base)
            return self._finish(report)
        rounds: tuple[tuple[SlotCopy, ...], ...] = ()
        sent = received = 0
        prepared = None
        if ok:
            rounds = chunk_copies(copies, copy_bytes=slot_copy_bytes(self.layers), chunk_bytes=self.chunk_bytes,
                                  num_ranks=self.ep_size)
            migration = SlotMigration(layers=self.layers, num_experts=self.num_experts, num_slots=self.num_slots,
                                      ep_size=self.ep_size, ep_rank=self.ep_rank, ep_group=self.ep_group,
                                      device=self._device, timeout_s=self.timeout_s, agreement=self._agreement,
                                      round_id=self._round, fault_hook=self.fault_hook)
            try:
                prepared = migration.prepare(old_LS, new_LS, copies)
            except Exception as err:  # any local failure becomes an abort vote
                ok, reason = False, f"rank {global_rank()}: preparing failed: {err!r}"
            with record_function("dualmoe/moe/eplb_migrate"):
                rounds_ok, rounds_reason, sent, received = migration.run(rounds, prepared)
            if ok and not rounds_ok:
                ok, reason = False, rounds_reason
        self._sync()  # the vote must follow the data, and the timings must include the device's work
        migrate_done = time.perf_counter()
        decision = self._decide(ok, reason)
        agree_done = time.perf_counter()
        applied = decision == "commit"
        if applied:
            assert prepared is not None  # a commit needs every rank ok, this one included
            migration.commit(prepared)
            self._sync()
        commit_done = time.perf_counter()
        report = RebalanceReport(
            applied=applied, status="applied" if applied else f"failed: {decision}", bytes_sent=sent,
            bytes_received=received, num_rounds=len(rounds), balancedness_after=after if applied else before,
            migrate_s=migrate_done - start, agree_s=agree_done - migrate_done, commit_s=commit_done - agree_done,
            **base)
        if applied:
            self.num_applied += 1
        else:
            self.num_failed += 1
            logger.warning("EPLB rebalance at step %d kept the old placement: %s%s", step, decision,
                           f" (this rank: {reason})" if reason and reason not in decision else "")
        return self._finish(report)

    # ---- observability -------------------------------------------------------------------------------
    def events(self, report: RebalanceReport, step: int, *, prefix: str = "Train/MoE") -> list[tuple[str, float, int]]:
        """Monitor events of one rebalance: balancedness before/after, copies, bytes, stall, failures."""
        names = {"balancedness_before": report.balancedness_before, "balancedness_after": report.balancedness_after,
                 "copies": float(report.num_copies) if report.applied else 0.0, "stall_ms": 1e3 * report.stall_s,
                 "plan_ms": 1e3 * report.plan_s, "bytes_sent": float(report.bytes_sent),
                 "applied": float(report.applied), "failures": float(self.num_failed)}
        return [(f"{prefix}/eplb/{key}", float(value), step) for key, value in names.items()]

    def write_events(self, report: RebalanceReport, step: int) -> None:
        """Send `events` to DeepSpeed's monitor (global rank 0, when a monitor is enabled)."""
        monitor = self.monitor
        if monitor is not None and getattr(monitor, "enabled", False) and global_rank() == 0:
            monitor.write_events(self.events(report, step))

    def dump_stats(self, path: str | Path) -> Path:
        """Write the planning load and the deployed maps for `dualmoe plan --stats` (.pt or .json)."""
        from .checkpoint import save_load_stats

        return save_load_stats(path, self.planning_load(), placement_LS=self.current_maps(), num_ranks=self.ep_size,
                               step=None if self.stats is None else self.stats.num_steps)

    def state_dict(self) -> dict[str, int | float]:
        """Counters (for checkpoints)."""
        return {"num_applied": self.num_applied, "num_failed": self.num_failed, "num_skipped": self.num_skipped,
                "stall_s": self.stall_s}

    def load_state_dict(self, state: dict[str, int | float]) -> None:
        """Restore `state_dict`."""
        self.num_applied, self.num_failed = int(state["num_applied"]), int(state["num_failed"])
        self.num_skipped, self.stall_s = int(state["num_skipped"]), float(state["stall_s"])

    # ---- internals ---------------------------------------------------------------------------------------
    def _finish(self, report: RebalanceReport) -> RebalanceReport:
        self.stall_s += report.stall_s
        self.last_report = report
        log_rank0(logger, "EPLB step %d: %s, balancedness %.4f -> %.4f, %d copies (%d remote) in %d rounds, "
                  "stall %.1f ms (plan %.1f ms)", report.step, report.status, report.balancedness_before,
                  report.balancedness_after, report.num_copies, report.num_remote_copies, report.num_rounds,
                  1e3 * report.stall_s, 1e3 * report.plan_s)
        return report

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _decide(self, ok: bool, reason: str) -> str:
        if self.fault_hook is not None:
            try:
                self.fault_hook("agree", self._round)
            except Exception as err:
                ok, reason = False, f"rank {global_rank()}: {err!r}"
        if self._agreement is None:
            return "commit" if ok else f"abort: {reason}"
        with record_function("dualmoe/moe/eplb_agree"):
            return self._agreement.decide(self._round, ok=ok, reason=reason, timeout_s=self.agree_timeout_s)

    def _digests_agree(self, new_LS: Tensor) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return True
        mine = torch.tensor([plan_digest(new_LS)], dtype=torch.int64, device=self._device)
        size = dist.get_world_size(self.group)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=self.group)
        return all(int(p) == int(mine) for p in parts)

    def _balancedness(self, old_LS: Tensor, new_LS: Tensor, plan: Plan,
                      load_LE: Tensor | None) -> tuple[float, float]:
        if load_LE is None:
            return float(plan.balancedness_before.mean()), float(plan.balancedness_after.mean())

        def overall(maps: Tensor) -> float:
            load_LG = gpu_load(maps, load_LE.cpu(), self.ep_size)
            top = float(load_LG.max(-1).values.sum())
            return 1.0 if top <= 0 else float(load_LG.mean(-1).sum()) / top

        return overall(old_LS), overall(new_LS)


def attach_rebalancer(engine: Any, **kwargs: Any) -> Rebalancer:
    """Build a `Rebalancer` for a MoE-aware DeepSpeed engine and run it after every optimizer step.

    The engine must come from `dualmoe.moe.hooks` (`moe_engine_class` / `initialize`): the rebalancer
    uses `engine.moe_stats`, writes to `engine.monitor` and registers with `add_moe_step_callback`, so it
    runs after the step's statistics, bias update and slot refresh. Collective (every rank calls it).

    Args:
        engine: the engine.
        **kwargs: passed to `Rebalancer` (chunk_bytes, timeout_s, debug, ...).

    Returns:
        The rebalancer, also stored as `engine.moe_rebalancer`.
    """
    from .hooks import moe_layers

    layers = moe_layers(engine.module)
    if not layers:
        raise ConfigError("attach_rebalancer: the engine's model has no MoELayer")
    kwargs.setdefault("monitor", getattr(engine, "monitor", None))
    rebalancer = Rebalancer(layers, stats=engine.moe_stats, **kwargs)
    engine.add_moe_step_callback(lambda eng: rebalancer.step(eng.global_steps, monitor_step=eng.global_samples))
    engine.moe_rebalancer = rebalancer
    return rebalancer
