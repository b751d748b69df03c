"""The top-level `"moe"` section of a DeepSpeed JSON: MoE layer shape, router and EPLB settings.

    {"train_micro_batch_size_per_gpu": 4,
     "moe": {"ep_size": 4, "num_experts": 64, "num_redundant_experts": 4, "top_k": 8,
             "num_shared_experts": 1,
             "router": {"score_func": "sigmoid", "n_group": 8, "topk_group": 4,
                        "routed_scaling_factor": 2.5, "bias_update_rate": 1e-3},
             "eplb": {"enabled": true, "interval": 100, "window": 32}}}

DeepSpeed keeps unknown top-level keys in `_param_dict` without looking at them, so the section is ours
alone and validated here. Physical layout: E logical experts live on S = E + R slots (R redundant),
S/ep_size slots per expert-parallel rank; each logical expert's trainable weights live on a fixed home
rank (E/ep_size experts per rank). Routing follows DeepSeek-V3: n_group groups of E/n_group experts,
keep the topk_group best groups (sum of each group's two best biased scores), top_k experts inside them.

Plan layer: plain dicts in, typed frozen objects out; no torch, torch.distributed or deepspeed imports.
`parse_moe_config` raises `ConfigError` naming the key, the value, the rule and a fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from dualmoe.errors import ConfigError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = ["EplbConfig", "MoEConfig", "RouterConfig", "parse_moe_config"]

_SECTION = "moe"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class RouterConfig(BaseModel):
    """How tokens pick experts and how the experts are kept balanced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Expert affinity: "sigmoid" (DeepSeek-V3) or "softmax" (Mixtral, Qwen-MoE)."""
    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek-V3: 8); 1 turns group limiting off."""
    topk_group: int = 1
    """Groups kept per token, ranked by the sum of each group's two best biased scores (DeepSeek-V3: 4)."""
    norm_topk_prob: bool = True
    """Renormalise the top_k gate values to sum to 1 before scaling."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed gate values (DeepSeek-V3: 2.5)."""
    bias_update_rate: float = 1e-3
    """Aux-loss-free balancing step: once per optimizer step `bias += rate * sign(mean_load - load)`; 0 = off."""
    seq_aux_alpha: float = 0.0
    """Weight of DeepSeek-V3's sequence-wise balance loss (paper: 1e-4); 0 = off."""
    aux_loss_alpha: float = 0.0
    """Weight of the Switch/Mixtral load-balancing loss over the micro-batch (Mixtral: 0.02); 0 = off."""

    @model_validator(mode="after")
    def _check_values(self) -> RouterConfig:
        if self.n_group < 1:
            raise ValueError(f"n_group={self.n_group}: must be >= 1; use 1 to turn group-limited routing off")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group}: must be between 1 and n_group ({self.n_group}); "
                             f"set topk_group <= {self.n_group}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor}: must be > 0 (DeepSeek-V3 uses "
                             "2.5, softmax routers 1.0)")
        for key in ("bias_update_rate", "seq_aux_alpha", "aux_loss_alpha"):
            value = getattr(self, key)
            if value < 0:
                raise ValueError(f"{key}={value}: must be >= 0; use 0 to turn it off")
        return self


class EplbConfig(BaseModel):
    """Periodic re-placement of experts on slots from measured load (consumed by the rebalancer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Re-place experts every `interval` optimizer steps."""
    interval: int = 100
    """Optimizer steps between two rebalances."""
    window: int = 32
    """Steps of per-expert token counts kept for planning (a sliding window, summed)."""
    ema: float | None = None
    """If set, plan from an exponential moving average with this decay in (0, 1) instead of the window."""
    policy: Literal["hierarchical", "global", "auto"] = "auto"
    """Planner policy; "auto" is hierarchical when n_group divides into num_nodes, else global."""
    max_moves: int | None = None
    """At most this many slot copies per layer per rebalance (None = unlimited)."""
    min_gain: float = 0.0
    """Skip a rebalance whose predicted balancedness gain (mean/max per-rank load) is below this."""
    num_nodes: int = 1
    """Nodes the EP group spans (for the hierarchical policy)."""
    copy_cost: float = 1e-4
    """Balancedness one layer must gain to be worth copying all its slots once (migration price)."""
    remote_cost: float | str = 0.05
    """Balancedness price of holding every slot of a layer off its expert's home rank (each such slot costs a
    weight refresh and a gradient send every step); 0 plans without regard to homes. "auto" derives it at
    each rebalance from the statistics' routed rows per EP rank and step: S * remote_slot_rows / rows."""
    remote_slot_rows: float = 1700.0
    """With remote_cost "auto": routed rows whose expert compute (forward and backward) takes as long as one
    remote slot's per-step weight refresh plus gradient send. Both scale with hidden x ffn, so it is a
    property of the machine (compute vs all-to-all speed), not of the model: about 1700 on 4x H100 in bf16
    (docs/BENCHMARKS.md)."""

    @model_validator(mode="after")
    def _check_values(self) -> EplbConfig:
        for key in ("interval", "window", "num_nodes"):
            value = getattr(self, key)
            if value < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema={self.ema}: the decay must lie in (0, 1), e.g. 0.9; or leave ema unset to "
                             "plan from the window")
        if self.max_moves is not None and self.max_moves < 0:
            raise ValueError(f"max_moves={self.max_moves}: must be >= 0, or null for no limit")
        if isinstance(self.remote_cost, str) and self.remote_cost != "auto":
            raise ValueError(f'remote_cost={self.remote_cost!r}: must be a number >= 0 or "auto"')
        for key in ("min_gain", "copy_cost", "remote_cost"):
            value = getattr(self, key)
            if value != "auto" and not value >= 0:
                raise ValueError(f"{key}={value}: must be >= 0" + (' or "auto"' if key == "remote_cost" else ""))
        if not self.remote_slot_rows > 0:
            raise ValueError(f"remote_slot_rows={self.remote_slot_rows}: must be > 0 (routed rows that cost as "
                             "much as one remote slot per step, about 1700 on H100)")
        return self


class MoEConfig(BaseModel):
    """Shape and parallel layout of every MoE layer of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_experts: int
    """E: logical routed experts per layer."""
    top_k: int
    """Routed experts per token."""
    ep_size: int = 1
    """Expert-parallel ranks; must divide E (home experts per rank) and S = E + R (slots per rank)."""
    num_redundant_experts: int = 0
    """R: extra physical slots holding replicas of logical experts (inference-style redundancy in training)."""
    num_shared_experts: int = 0
    """Always-on experts added to the routed output (one MLP of num_shared_experts x expert FFN width)."""
    router: RouterConfig = RouterConfig()
    """Routing and balancing settings."""
    eplb: EplbConfig = EplbConfig()
    """Periodic rebalancing settings."""
    overlap_refresh: bool = True
    """Refresh replica weights after each optimizer step asynchronously, on a second communicator over the EP
    ranks: the next forward starts while they arrive (each layer waits only when it uses its replicas)."""
    overlap_grad_reduce: bool = True
    """With overlap_refresh: armed by the engine for a step's last micro-batch, each layer's replica gradients
    leave for home (on that second communicator) as soon as the backward has passed the layer."""

    @property
    def num_slots(self) -> int:
        """S = E + R physical expert slots per layer."""
        return self.num_experts + self.num_redundant_experts

    @model_validator(mode="after")
    def _check_shape(self) -> MoEConfig:
        e, r, ep = self.num_experts, self.num_redundant_experts, self.ep_size
        if e < 1:
            raise ValueError(f"num_experts={e}: must be >= 1")
        if r < 0:
            raise ValueError(f"num_redundant_experts={r}: must be >= 0")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts}: must be >= 0")
        if ep < 1:
            raise ValueError(f"ep_size={ep}: must be >= 1")
        if e % ep:
            raise ValueError(f"ep_size={ep}: num_experts ({e}) must be divisible by ep_size (each EP rank is home "
                             f"to E/ep_size experts); use an ep_size among {_divisors(e)}")
        if (e + r) % ep:
            fix = (ep - (e + r) % ep) % ep
            raise ValueError(f"num_redundant_experts={r}: slots S = num_experts + num_redundant_experts = {e + r} "
                             f"must be divisible by ep_size ({ep}); add {fix} redundant experts (or remove "
                             f"{(e + r) % ep})")
        self._check_routing()
        self._check_eplb()
        return self

    def _check_routing(self) -> None:
        e, k, rc = self.num_experts, self.top_k, self.router
        if e % rc.n_group:
            raise ValueError(f"router.n_group={rc.n_group}: num_experts ({e}) must be divisible by n_group; "
                             f"use an n_group among {_divisors(e)}")
        per_group = e // rc.n_group
        reachable = rc.topk_group * per_group
        if not 1 <= k <= reachable:
            raise ValueError(f"top_k={k}: must be between 1 and the experts of the kept groups (topk_group "
                             f"{rc.topk_group} x {per_group} experts per group = {reachable}); lower top_k or "
                             f"raise router.topk_group")

    def _check_eplb(self) -> None:
        cfg = self.eplb
        if not cfg.enabled:
            return
        if self.ep_size % cfg.num_nodes:
            raise ValueError(f"eplb.num_nodes={cfg.num_nodes}: ep_size ({self.ep_size}) must be divisible by "
                             f"num_nodes; use num_nodes among {_divisors(self.ep_size)}")
        if cfg.policy == "hierarchical" and self.router.n_group % cfg.num_nodes:
            raise ValueError(f"eplb.policy='hierarchical': router.n_group ({self.router.n_group}) must be "
                             f"divisible by eplb.num_nodes ({cfg.num_nodes}); use policy 'global' or 'auto'")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class a pydantic error location points into (for listing its valid keys)."""
    model: type[BaseModel] = MoEConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def _format_validation_error(err: ValidationError, section: str) -> str:
    """One clause per problem: the dotted key, the value given, the rule and what would be valid."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(part) for part in (section, *loc))
        ctx_error = (item.get("ctx") or {}).get("error")
        if item["type"] == "value_error" and ctx_error is not None:
            # Our validators already name the key relative to their model; prefix the path to it.
            lines.append(f"{key}.{ctx_error}" if loc else f"{section}.{ctx_error}")
        elif item["type"] == "extra_forbidden":
            valid = ", ".join(sorted(_model_at(loc).model_fields))
            lines.append(f"{key}={item.get('input')!r}: unknown key; valid keys: {valid}")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}={item.get('input')!r}: {item['msg']}")
    return "; ".join(lines)


def parse_moe_config(ds_config: Mapping[str, Any], *, section: str = _SECTION) -> MoEConfig | None:
    """Read and check the MoE section of a DeepSpeed config dict.

    Args:
        ds_config: the whole DeepSpeed JSON as a dict.
        section: the top-level key holding our settings.

    Returns:
        The typed settings, or None when the JSON has no such section.

    Raises:
        ConfigError: an unknown key, a bad value or an impossible combination; the message names the
            dotted key (`moe.router.n_group`), the value, the rule and a fix.
    """
    raw = ds_config.get(section)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}={raw!r} must be a JSON object")
    try:
        return MoEConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, section)) from None
