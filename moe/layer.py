"""`MoELayer`: DeepSeek-V3 MoE block (router, routed experts on physical slots, shared experts).

Legend: T tokens, D hidden size, K top_k, E logical experts, S slots, X max replicas, N = T*K.

    x_TD -> gate -> topk_ids_TK (logical), topk_weights_TK
         -> choose_replica_slots -> position_TK (the chosen slot's compute position, `SlotLayout`)
         -> dispatch (sort, all-to-all) -> SlotExperts (grouped SwiGLU) -> combine (all-to-all, unsort)
         -> sum_k w_tk * y_tk  (+ shared_experts(x_TD))  -> y_TD

Slots on their expert's home rank compute with the home parameter itself and put their dW straight
into its `.grad`; only slots holding another rank's expert use replica buffers (see `SlotExperts`).

Step-boundary contract (see `dualmoe.moe.hooks`, which drives it for a DeepSpeed engine):
  1. after the last backward of a step and before gradients are reduced: `reduce_slot_grads()`
     (replica gradients -> summed into their homes' `.grad`; nothing to send with R = 0),
  2. after the optimizer step: `refresh_slots()` (home weights -> replica buffers; nothing with R = 0),
     and `update_bias(load_E)` with the step's globally reduced counts (`LoadStats.step()`).
Because replicas are copies refreshed from one home and their gradients are summed before the step,
training with R > 0 redundant slots is the same function as with R = 0.

Rebalancing (the EPLB rebalancer): between steps, `set_placement(new)` swaps the maps and fetches the
replicas a rank did not hold before from their homes; no parameter or optimizer state moves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dualmoe.errors import ConfigError, PlacementError
from dualmoe.log import warn_once
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx
from torch.profiler import record_function

from .config import MoEConfig
from .dispatch import TokenDispatcher, choose_replica_slots
from .experts import SlotExperts, expert_group_name
from .placement import Placement, ReplicaExchange, SlotLayout, replica_exchange, slot_layout
from .router import Router

__all__ = ["MoELayer", "SharedExperts"]

logger = logging.getLogger(__name__)


_REFRESH_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def refresh_group_for(ep_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A second process group over `ep_group`'s ranks (one per rank set, shared by all layers).

    Created with `use_local_synchronization`, so only the group's members take part (every member's layers
    ask for it in the same order). Its own communicator lets the asynchronous replica refresh run beside the
    forward's all-to-alls instead of queueing with them.
    """
    ranks = tuple(dist.get_process_group_ranks(ep_group))
    group = _REFRESH_GROUPS.get(ranks)
    if group is None or group not in dist.distributed_c10d._world.pg_map:  # none yet, or destroyed since
        group = dist.new_group(list(ranks), use_local_synchronization=True)
        _REFRESH_GROUPS[ranks] = group
    return group


class SharedExperts(nn.Module):
    """Always-on SwiGLU MLP (names of transformers' `DeepseekV3MLP`: gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, **kw)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _AttachAuxLoss(torch.autograd.Function):
    """Returns `y`; its backward also sends `scale` as the gradient of `aux_loss` (Megatron's trick),
    so the aux loss trains the router without changing what the layer returns."""

    @staticmethod
    def forward(ctx: FunctionCtx, y: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.aux_shape, ctx.scale = aux_loss.shape, scale
        ctx.aux_meta = (aux_loss.dtype, aux_loss.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        dtype, device = ctx.aux_meta
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=dtype, device=device), None


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # -1 outside a backward pass


class _AfterBackward(torch.autograd.Function):
    """Identity on the layer input whose backward runs `callback` once the whole layer's backward is done."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, anchor: Tensor, callback: Callable[[], None]) -> Tensor:
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.callback()
        return grad, None, None


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward now is activation checkpointing's recompute."""
    return _graph_task_id is not None and _graph_task_id() != -1


class MoELayer(nn.Module):
    """DeepSeek-V3 MoE layer with expert parallelism over redundant physical slots.

    Args:
        config: the validated `"moe"` section.
        hidden_size: D.
        ffn_hidden_size: I, each routed expert's FFN width (shared experts: I x num_shared_experts).
        layer_id: index of this MoE layer in the model (seeds expert init; names stats).
        ep_group: the EP process group (size `config.ep_size`); may come later via `set_groups` or
            DeepSpeed's `set_deepspeed_parallelism`. Not needed when ep_size == 1.
        stats_group: group to sum load counts over (all ranks running this layer); None = default group.
        dtype, device: of the parameters (the router weight stays at least fp32).
        init_std: std of the normal init of expert weights.
        seed: expert e's init depends only on (seed, layer_id, e), so it is the same at any EP size;
            default draws one from torch's global RNG.

    Forward: `[..., D] -> [..., D]`. `aux_loss` holds the last (detached) aux loss, if enabled.
    """

    def __init__(self, config: MoEConfig, *, hidden_size: int, ffn_hidden_size: int, layer_id: int = 0,
                 ep_group: dist.ProcessGroup | None = None, stats_group: dist.ProcessGroup | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 init_std: float = 0.02, seed: int | None = None) -> None:
        super().__init__()
        self.config, self.layer_id, self.hidden_size = config, layer_id, hidden_size
        e, s, ep = config.num_experts, config.num_slots, config.ep_size
        self.gate = Router(config, hidden_size, dtype=dtype, device=device)
        self.experts = SlotExperts(num_experts=e, num_slots=s, ep_size=ep, hidden_size=hidden_size,
                                   ffn_hidden_size=ffn_hidden_size, dtype=dtype, device=device)
        self.shared_experts = (SharedExperts(hidden_size, ffn_hidden_size * config.num_shared_experts, dtype=dtype,
                                             device=device) if config.num_shared_experts else None)
        self.dispatcher = TokenDispatcher(num_slots=s)
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.long, device=device), persistent=False)
        self.placement = Placement.identity(e, s, num_ranks=ep)
        self.aux_loss_grad_scale = 1.0
        self.aux_loss: Tensor | None = None
        self._init = (init_std, int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)
        self._weights_loaded = False
        self._slots_stale = True
        self._home_versions: tuple[int, ...] = ()
        self.ep_group: dist.ProcessGroup | None = None
        self.refresh_group: dist.ProcessGroup | None = None  # same ranks, own communicator (overlap_refresh)
        self._reduce_armed = False
        self.stats_group = stats_group
        self.ep_rank = self._guess_ep_rank()
        self.experts.set_layout(slot_layout(self.placement, self.ep_rank))
        self._write_maps(device)
        self._groups_ready = ep == 1
        self._init_experts()
        if ep_group is not None:
            self.set_groups(ep_group=ep_group, stats_group=stats_group)

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """E logical experts."""
        return self.config.num_experts

    @property
    def ep_size(self) -> int:
        """P expert-parallel ranks."""
        return self.config.ep_size

    @property
    def home_experts(self) -> range:
        """Logical experts whose trainable weights live on this rank."""
        n = self.num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    # ---- groups ----------------------------------------------------------------------------------
    def _guess_ep_rank(self) -> int:
        # DeepSpeed's default (E + D) layout puts EP groups on consecutive ranks; set_groups corrects it.
        if self.ep_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank() % self.ep_size

    def set_groups(self, *, ep_group: dist.ProcessGroup | None,
                   stats_group: dist.ProcessGroup | None = None) -> None:
        """Bind the expert-parallel group (and the group load counts are summed over).

        Raises:
            ConfigError: the group's size differs from `config.ep_size`.
        """
        size = 1 if ep_group is None else dist.get_world_size(ep_group)
        if size != self.ep_size:
            raise ConfigError(f"moe.ep_size={self.ep_size} but the expert-parallel group of layer {self.layer_id} "
                              f"has {size} ranks; set moe.ep_size to {size} or pass a group of {self.ep_size}")
        rank = 0 if ep_group is None else dist.get_rank(ep_group)
        if rank != self.ep_rank and self._weights_loaded:
            raise ConfigError(f"layer {self.layer_id}: expert weights were loaded for EP rank {self.ep_rank} "
                              f"before the EP group was set (this rank is EP rank {rank}); load them after "
                              "deepspeed.initialize or pass ep_group to the constructor")
        self.ep_group = ep_group if size > 1 else None
        self.refresh_group = refresh_group_for(ep_group) if size > 1 and self.config.overlap_refresh else None
        self.stats_group = stats_group if stats_group is not None else self.stats_group
        self.dispatcher.set_group(self.ep_group)
        if rank != self.ep_rank:
            self.ep_rank = rank
            self.experts.set_layout(slot_layout(self.placement, rank))
            self._write_maps()
            self._init_experts()
        self._groups_ready = True
        self._slots_stale = True

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by `DeepSpeedEngine`: create/find DeepSpeed's `ep_size_<P>` groups and bind them."""
        from deepspeed.utils import groups

        name = expert_group_name(self.ep_size)
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.set_groups(ep_group=groups._get_expert_parallel_group(name),
                        stats_group=groups._get_data_parallel_group())

    # ---- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_experts(self) -> None:
        std, seed = self._init
        for local, expert in enumerate(self.home_experts):
            gen = torch.Generator().manual_seed(seed + 1_000_003 * self.layer_id + 7919 * expert)
            for home in (self.experts.gate_up_proj, self.experts.down_proj):
                home[local].copy_(torch.randn(home.shape[1:], generator=gen, dtype=torch.float32) * std)
        self._slots_stale = True

    @torch.no_grad()
    def load_expert_weights(self, gate_up_proj: Tensor, down_proj: Tensor) -> None:
        """Load all E logical experts ([E, 2I, D] and [E, D, I], transformers' layout); keeps the homes."""
        home = self.home_experts
        self.experts.gate_up_proj.copy_(gate_up_proj[home.start:home.stop])
        self.experts.down_proj.copy_(down_proj[home.start:home.stop])
        self._weights_loaded = True
        self._slots_stale = True

    @torch.no_grad()
    def gather_expert_weights(self) -> tuple[Tensor, Tensor]:
        """All E logical experts ([E, 2I, D], [E, D, I]) gathered over the EP group (collective)."""
        out = []
        for home in (self.experts.gate_up_proj, self.experts.down_proj):
            if self.ep_group is None:
                out.append(home.detach().clone())
                continue
            parts = [torch.empty_like(home) for _ in range(self.ep_size)]
            dist.all_gather(parts, home.detach().contiguous(), group=self.ep_group)
            out.append(torch.cat(parts))
        return out[0], out[1]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._slots_stale = True

    # ---- placement and slots ----------------------------------------------------------------------
    @property
    def layout(self) -> SlotLayout:
        """This rank's `SlotLayout` (compute positions, replica rows, exchange) of the current placement."""
        return self.experts.layout

    def _write_maps(self, device: torch.device | str | None = None) -> None:
        p, position = self.placement, self.experts.layout.position_of_slot
        dev = device if device is not None else self.tokens_per_expert.device
        self.register_buffer("physical_to_logical", torch.tensor(p.physical_to_logical, device=dev),
                             persistent=False)
        self.register_buffer("logical_to_physical", torch.tensor(p.logical_to_physical, device=dev),
                             persistent=False)
        # The dispatcher routes by compute position: the same slot choice, numbered for the grouped GEMM.
        l2pos = [[position[s] if s >= 0 else -1 for s in row] for row in p.logical_to_physical]
        self.register_buffer("logical_to_position", torch.tensor(l2pos, device=dev), persistent=False)
        self.register_buffer("replica_count", torch.tensor(p.replica_count, device=dev), persistent=False)

    def set_placement(self, placement: Placement, *,
                      refresh: Literal["changed", "all", "lazy", "none"] = "changed") -> None:
        """Switch to `placement` (same on every EP rank) and fill the replica buffers it needs.

        Call between steps: after `reduce_slot_grads` and before the next forward.

        Args:
            placement: the new maps.
            refresh: "changed" fetches only the remote experts a rank did not hold before (collective),
                "all" every replica (collective), "lazy" marks the replicas stale for the next forward,
                "none" takes the rows staged through `experts.slot_gate_up/slot_down.index_copy_` (the
                rebalancer's commit) and the replicas already held, without communication.

        Raises:
            PlacementError: a placement of another shape.
            RuntimeError: slot gradients are pending (not yet reduced into the homes), or "none" while a
                needed replica is neither held nor staged.
        """
        old = self.placement
        if (placement.num_experts, placement.num_slots, placement.num_ranks) != (
                old.num_experts, old.num_slots, old.num_ranks):
            raise PlacementError(f"layer {self.layer_id}: new placement has E={placement.num_experts}, "
                                 f"S={placement.num_slots}, P={placement.num_ranks}; the layer has "
                                 f"E={old.num_experts}, S={old.num_slots}, P={old.num_ranks}")
        if self.experts.has_slot_grads():
            raise RuntimeError(f"layer {self.layer_id}: set_placement with unreduced slot gradients; call "
                               "reduce_slot_grads first (placements change only between steps)")
        layout = slot_layout(placement, self.ep_rank)
        missing = self.experts.missing_replicas(layout)
        if refresh == "none" and missing and not self._slots_stale:
            raise RuntimeError(f"layer {self.layer_id}: set_placement(refresh='none') but EP rank {self.ep_rank} "
                               f"holds no staged or current rows for remote experts {list(missing)}")
        self.experts.set_layout(layout)
        self.placement = placement
        self._write_maps()
        if refresh == "none":
            return
        if refresh == "lazy" or self._slots_stale:
            self._slots_stale = True
        elif refresh == "all":
            self.refresh_slots()
        else:
            self._fetch_replicas(replica_exchange(placement, self.ep_rank, held=old))

    def refresh_slots(self) -> None:
        """Copy home weights into every replica buffer row (collective over EP; nothing to do with R = 0).

        With `config.overlap_refresh` (and EP > 1) the exchange runs asynchronously on `refresh_group`; the
        layer's next use of its replicas waits for it (`SlotExperts.wait_refresh`).
        """
        self._check_groups()
        if not self.experts.replicas_match_homes():
            self.experts.match_homes()
        if self.refresh_group is not None and self.experts.layout.exchange.any_rows:
            self.experts.refresh_replicas(self.experts.layout.exchange, self.refresh_group, async_op=True)
        else:
            self._fetch_replicas(self.experts.layout.exchange)
        self._slots_stale = False
        self._home_versions = self._versions()

    def _fetch_replicas(self, exchange: ReplicaExchange) -> None:
        # No collective when no rank needs a row (decided identically on every rank).
        if exchange.any_rows:
            self.experts.refresh_replicas(exchange, self.ep_group)

    def arm_slot_grad_reduce(self) -> None:
        """Send replica gradients home as soon as the next backward has passed this layer (overlapping the
        backward of the layers before it), instead of at `reduce_slot_grads`.

        Call on every EP rank before the backward of a step's last micro-batch. Nothing happens without
        `overlap_grad_reduce` and `overlap_refresh` (the transfer needs `refresh_group`), without remote
        replicas, or while a weight-grad queue defers dW (the pipeline's W split: gradients are complete only
        after its W work).
        """
        self._reduce_armed = (self.config.overlap_grad_reduce and self.refresh_group is not None
                              and self.experts.layout.any_remote and self.experts._queue is None)

    def _backward_done(self) -> None:
        if self._reduce_armed:
            self._reduce_armed = False
            self.experts.start_reduce(self.refresh_group)

    def reduce_slot_grads(self) -> list[nn.Parameter]:
        """Sum replica gradients into their homes' `.grad` (collective over EP when replicas exist).

        Returns:
            The home parameters (their `.grad` holds this rank's full expert gradient, or was already
            handed to the optimizer by the engine's per-micro-batch hook work).
        """
        self._check_groups()
        return self.experts.reduce_slot_grads(self.ep_group if self.experts.layout.any_remote else None)

    def _versions(self) -> tuple[int, ...]:
        return (self.experts.gate_up_proj._version, self.experts.down_proj._version)

    def _check_groups(self) -> None:
        if not self._groups_ready:
            raise RuntimeError(f"MoE layer {self.layer_id} has ep_size={self.ep_size} but no EP group yet; pass "
                               "ep_group, call set_groups, or build the model into a DeepSpeed engine first")

    # ---- statistics and balancing -----------------------------------------------------------------
    @torch.no_grad()
    def take_local_load(self) -> Tensor:
        """[E] routed copies per logical expert on this rank since the last call; resets the counter."""
        load = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return load

    def update_bias(self, load_E: Tensor) -> None:
        """Aux-loss-free balancing step from the step's globally reduced counts (all ranks identical)."""
        self.gate.update_bias(load_E)

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor) -> Tensor:
        """Route, dispatch, run experts, combine, add shared experts: `[..., D] -> [..., D]`."""
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, self.hidden_size)
        self._before_forward()
        if (self.config.overlap_grad_reduce and self.refresh_group is not None and self.experts.layout.any_remote
                and torch.is_grad_enabled()):
            # The earliest point where this layer's replica gradients are complete (arm_slot_grad_reduce).
            x_TD = _AfterBackward.apply(x_TD, self.experts._grad_anchor(x_TD.device), self._backward_done)
        num_seq = math.prod(shape[:-2]) if len(shape) >= 3 else 1
        with record_function("dualmoe/moe/router"):
            routed = self.gate(x_TD, num_sequences=num_seq)
            if self.training and not _in_backward():  # a checkpoint's recompute routes the same tokens again
                self.tokens_per_expert.add_(torch.bincount(routed.topk_ids.reshape(-1), minlength=self.num_experts))
            position_TK = choose_replica_slots(routed.topk_ids, self.logical_to_position, self.replica_count,
                                               rotation=self.ep_rank)
        d = self.dispatcher
        x_ND, state = d.dispatch_preprocess(x_TD, position_TK)
        x_MD = d.dispatch_postprocess(d.token_dispatch(x_ND, state), state)
        y_MD = self.experts(x_MD, state.tokens_per_local_slot)
        y_ND = d.token_combine(d.combine_preprocess(y_MD, state), state)
        y_TD = d.combine_postprocess(y_ND, routed.topk_weights, state)
        if self.shared_experts is not None:
            with record_function("dualmoe/moe/shared"):
                y_TD = y_TD + self.shared_experts(x_TD)
        self.aux_loss = None if routed.aux_loss is None else routed.aux_loss.detach()
        if routed.aux_loss is not None:
            y_TD = _AttachAuxLoss.apply(y_TD, routed.aux_loss, self.aux_loss_grad_scale)
        return y_TD.view(shape)

    def _before_forward(self) -> None:
        self._check_groups()
        if self._slots_stale or not self.experts.replicas_match_homes():
            self.refresh_slots()
        elif self.training and self.experts.layout.any_remote and self._versions() != self._home_versions:
            warn_once(logger, "MoE home expert weights changed since the slots were last refreshed; call "
                              "dualmoe.moe.hooks.refresh_slots(model) after every optimizer step (an engine from "
                              "dualmoe.moe.hooks.moe_engine_class does it)")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MoELayer:
        super()._apply(fn, recurse)
        self._slots_stale = True  # moved or cast weights: slots follow the homes at the next forward
        return self

    def extra_repr(self) -> str:
        c = self.config
        return (f"E={c.num_experts}, S={c.num_slots}, top_k={c.top_k}, ep_size={c.ep_size}, "
                f"ep_rank={self.ep_rank}, shared={c.num_shared_experts}, score_func={c.router.score_func}")
