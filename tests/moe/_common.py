"""Shared builders for the MoE tests: tiny configs, a single-process reference layer, rank inputs, groups."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from dualmoe.moe.config import MoEConfig, RouterConfig
from dualmoe.moe.layer import MoELayer

HIDDEN, FFN = 8, 6  # hidden size, expert FFN width


def moe_config(*, ep: int = 1, r: int = 0, e: int = 8, k: int = 3, n_group: int = 4, topk_group: int = 2,
               shared: int = 1, rate: float = 0.05, score: str = "sigmoid", aux: float = 0.0,
               seq_aux: float = 0.0) -> MoEConfig:
    router = RouterConfig(score_func=score, n_group=n_group, topk_group=topk_group, bias_update_rate=rate,
                          routed_scaling_factor=2.5 if score == "sigmoid" else 1.0, aux_loss_alpha=aux,
                          seq_aux_alpha=seq_aux)
    return MoEConfig(num_experts=e, top_k=k, ep_size=ep, num_redundant_experts=r, num_shared_experts=shared,
                     router=router)


def reference_layer(cfg: MoEConfig, *, seed: int = 0) -> MoELayer:
    """One-process layer (ep 1, no replicas) in float64 with random weights and router bias."""
    one = cfg.model_copy(update={"ep_size": 1, "num_redundant_experts": 0})
    torch.manual_seed(seed)
    layer = MoELayer(one, hidden_size=HIDDEN, ffn_hidden_size=FFN, dtype=torch.float64, seed=seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
        layer.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return layer


def copy_weights(dst: MoELayer, ref: MoELayer) -> None:
    """Give `dst` (any EP size / replicas) the logical weights of `ref`."""
    with torch.no_grad():
        dst.gate.weight.copy_(ref.gate.weight)
        dst.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
        if ref.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(dst.shared_experts, name).weight.copy_(getattr(ref.shared_experts, name).weight)
    dst.load_expert_weights(ref.experts.gate_up_proj, ref.experts.down_proj)


def rank_batch(rank: int, *, seed: int = 1, step: int = 0, shape: tuple[int, int] = (2, 5)) -> tuple[Any, Any]:
    """Input and target of one rank for one step (same on every process)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step * 101 + rank)
    x = torch.randn(*shape, HIDDEN, generator=gen, dtype=torch.float64)
    return x, torch.randn(*shape, HIDDEN, generator=gen, dtype=torch.float64)


def ep_groups(world: int, ep: int) -> tuple[Any, Any]:
    """(EP group, expert-DP group) of this rank; EP groups are consecutive ranks (DeepSpeed's default)."""
    rank = dist.get_rank()
    ep_group = edp_group = None
    for start in range(0, world, ep):
        g = dist.new_group(list(range(start, start + ep)))
        if rank in range(start, start + ep):
            ep_group = g
    for pos in range(ep):
        g = dist.new_group(list(range(pos, world, ep)))
        if rank % ep == pos:
            edp_group = g
    return ep_group, edp_group


def dense_params(layer: MoELayer) -> list[torch.nn.Parameter]:
    """Every parameter except the expert homes (reduced over the whole DP world)."""
    homes = {id(layer.experts.gate_up_proj), id(layer.experts.down_proj)}
    return [p for p in layer.parameters() if id(p) not in homes]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
