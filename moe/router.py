"""DeepSeek-V3 router: sigmoid or softmax scores, group-limited top-k, aux-loss-free bias, aux losses.

Legend: T tokens, E logical experts, K = top_k, G = n_group, B sequences, D hidden size.

    logits_TE  = x_TD @ weight_ED.T                       (fp32, or fp64 for an fp64 model)
    scores_TE  = sigmoid(logits) | softmax(logits)
    choice_TE  = scores + e_score_correction_bias          (bias only steers selection)
    group_TG   = sum of the 2 best choice scores per group; keep topk_group groups
    topk_ids_TK  = top_k of choice inside the kept groups
    topk_weights_TK = scores[topk_ids] (unbiased) / sum (if norm_topk_prob) * routed_scaling_factor

This is transformers' `DeepseekV3TopkRouter` (modeling_deepseek_v3.py), generalised to softmax scores
(Mixtral/Qwen-MoE: n_group = 1, no scaling). The bias follows the DeepSeek-V3 report (arXiv
2412.19437, sec. 2.1.2): after each optimizer step, `bias += rate * sign(mean_load - load)` from the
step's globally reduced token counts. Aux losses: the Switch/Mixtral loss `alpha * E * sum_e f_e P_e`
(f_e = selections of e per token, P_e = mean probability) over the micro-batch, and DeepSeek-V3's
sequence-wise loss `alpha * sum_e f_e P_e` with f_e = E/(K T) * selections in the sequence and P_e the
mean normalised score, averaged over sequences. No token is ever dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MoEConfig, RouterConfig

__all__ = [
    "Router",
    "RouterOutput",
    "group_limited_topk",
    "route",
    "seq_aux_loss",
    "switch_aux_loss",
    "updated_bias",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterOutput:
    """What the router hands the dispatcher."""

    topk_ids: Tensor
    """[T, K] int64 logical expert ids."""
    topk_weights: Tensor
    """[T, K] gate values (router compute dtype), differentiable w.r.t. the router weight and x."""
    aux_loss: Tensor | None
    """Scalar sum of the enabled aux losses (already weighted by alpha), or None."""


def group_limited_topk(choice_TE: Tensor, *, n_group: int, topk_group: int, top_k: int) -> Tensor:
    """Top-k experts restricted to the `topk_group` best of `n_group` equal expert groups.

    A group's score is the sum of its two best `choice` scores (its single best if a group has one
    expert). Ties break like `torch.topk`.

    Args:
        choice_TE: [T, E] selection scores (biased).
        n_group: G; E must be divisible by it. 1 means plain top-k.
        topk_group: groups kept per token.
        top_k: K experts per token.

    Returns:
        [T, K] int64 expert ids (unsorted).
    """
    num_tokens, num_experts = choice_TE.shape
    if n_group > 1:
        per_group = num_experts // n_group
        grouped = choice_TE.view(num_tokens, n_group, per_group)
        group_scores_TG = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        kept_TG = group_scores_TG.topk(topk_group, dim=-1, sorted=False).indices
        mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, kept_TG, True)
        mask_TE = mask_TG.unsqueeze(-1).expand(-1, -1, per_group).reshape(num_tokens, num_experts)
        choice_TE = choice_TE.masked_fill(~mask_TE, float("-inf"))
    return choice_TE.topk(top_k, dim=-1, sorted=False).indices


def route(logits_TE: Tensor, bias_E: Tensor | None, cfg: RouterConfig, *, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, selection and gate values from router logits.

    Returns:
        (topk_ids_TK, topk_weights_TK, scores_TE): ids int64; weights and scores in the logits' dtype.
    """
    if cfg.score_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
    else:
        scores_TE = logits_TE.softmax(dim=-1)
    with torch.no_grad():
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.to(scores_TE.dtype)
        topk_ids_TK = group_limited_topk(choice_TE, n_group=cfg.n_group, topk_group=cfg.topk_group, top_k=top_k)
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if cfg.norm_topk_prob:
        topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids_TK, topk_weights_TK * cfg.routed_scaling_factor, scores_TE


def _selections(topk_ids_TK: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    counts_E = torch.zeros(num_experts, dtype=dtype, device=topk_ids_TK.device)
    return counts_E.scatter_add_(0, topk_ids_TK.reshape(-1), torch.ones_like(topk_ids_TK.reshape(-1), dtype=dtype))


def _probabilities(scores_TE: Tensor, score_func: str) -> Tensor:
    # Softmax scores are probabilities already; sigmoid scores are normalised per token (DeepSeek-V3 eq. 19).
    if score_func == "softmax":
        return scores_TE
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


def switch_aux_loss(probs_TE: Tensor, topk_ids_TK: Tensor) -> Tensor:
    """Switch/Mixtral load-balancing loss `E * sum_e (selections_e / T) * mean_t probs_te` (alpha not applied).

    Equals transformers' Mixtral `load_balancing_loss_func` for one layer without padding mask.
    """
    num_tokens, num_experts = probs_TE.shape
    f_E = _selections(topk_ids_TK, num_experts, probs_TE.dtype) / num_tokens
    return num_experts * (f_E * probs_TE.mean(dim=0)).sum()


def seq_aux_loss(probs_BTE: Tensor, topk_ids_BTK: Tensor) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss `mean_b sum_e f_be P_be` (alpha not applied).

    f_be = E / (K T) * (selections of e in sequence b), P_be = mean over the sequence of the normalised score.
    """
    num_seq, seq_len, num_experts = probs_BTE.shape
    top_k = topk_ids_BTK.shape[-1]
    ones = torch.ones_like(topk_ids_BTK.reshape(num_seq, -1), dtype=probs_BTE.dtype)
    counts_BE = torch.zeros(num_seq, num_experts, dtype=probs_BTE.dtype, device=probs_BTE.device)
    counts_BE.scatter_add_(1, topk_ids_BTK.reshape(num_seq, -1), ones)
    f_BE = counts_BE * (num_experts / (top_k * seq_len))
    return (f_BE * probs_BTE.mean(dim=1)).sum(dim=-1).mean()


def updated_bias(bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing step: `bias + rate * sign(mean(load) - load)` (rate 0 returns bias).

    Args:
        bias_E: [E] current bias (kept in fp32).
        load_E: [E] tokens routed to each expert in the step, summed over micro-batches and ranks.
        rate: the update speed gamma (DeepSeek-V3: 1e-3).
    """
    if rate == 0:
        return bias_E
    load = load_E.to(torch.float64)
    return bias_E + (rate * torch.sign(load.mean() - load)).to(bias_E.dtype)


class Router(nn.Module):
    """The gate of one MoE layer: `weight [E, D]` and the buffer `e_score_correction_bias [E]`.

    Parameter and buffer names match transformers' `DeepseekV3TopkRouter`, so its weights load as is.
    The bias stays float32 when the module is cast to another dtype (a bf16 bias would swallow 1e-3
    updates); only its device follows the module.

    Args:
        config: the MoE section (E, top_k, router settings).
        hidden_size: D.
        dtype: weight dtype; float32 by default (the router runs in fp32, or fp64 for an fp64 weight).
        device: where to allocate.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = config.router
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        weight_dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size, dtype=weight_dtype, device=device))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(config.num_experts, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: Tensor, *, num_sequences: int = 1) -> RouterOutput:
        """Route `x_TD` ([T, D], T = num_sequences x sequence length for the sequence-wise loss)."""
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        logits_TE = F.linear(x_TD.to(compute), self.weight.to(compute))
        ids, weights, scores_TE = route(logits_TE, self.e_score_correction_bias, self.cfg, top_k=self.top_k)
        return RouterOutput(topk_ids=ids, topk_weights=weights, aux_loss=self._aux_loss(scores_TE, ids, num_sequences))

    def _aux_loss(self, scores_TE: Tensor, ids_TK: Tensor, num_sequences: int) -> Tensor | None:
        cfg = self.cfg
        if not (self.training and torch.is_grad_enabled()) or (cfg.aux_loss_alpha == 0 and cfg.seq_aux_alpha == 0):
            return None
        probs_TE = _probabilities(scores_TE, cfg.score_func)
        loss = probs_TE.new_zeros(())
        if cfg.aux_loss_alpha > 0:
            loss = loss + cfg.aux_loss_alpha * switch_aux_loss(probs_TE, ids_TK)
        if cfg.seq_aux_alpha > 0:
            b = num_sequences
            loss = loss + cfg.seq_aux_alpha * seq_aux_loss(probs_TE.view(b, -1, self.num_experts),
                                                           ids_TK.view(b, -1, self.top_k))
        return loss

    @torch.no_grad()
    def update_bias(self, load_E: Tensor) -> None:
        """Apply one balancing step from the step's globally reduced per-expert token counts."""
        new = updated_bias(self.e_score_correction_bias, load_E.to(self.e_score_correction_bias.device),
                           self.cfg.bias_update_rate)
        self.e_score_correction_bias.copy_(new)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Router:
        bias = self._buffers["e_score_correction_bias"]
        super()._apply(fn, recurse)
        moved = self._buffers["e_score_correction_bias"]
        if moved is not None and bias is not None and moved.dtype != bias.dtype:
            self._buffers["e_score_correction_bias"] = bias.to(device=moved.device)
        return self
