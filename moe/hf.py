"""Adapters between transformers' sparse-MoE blocks and dualmoe's `MoELayer` (transformers >= 5, fused experts).

    model = AutoModelForCausalLM.from_pretrained(...)            # DeepSeek-V3, Mixtral, Qwen2-MoE, Qwen3-MoE
    moe_cfg = moe_config_from_hf(model.config, ep_size=2, num_redundant_experts=2, eplb={"enabled": True})
    replace_moe_blocks(model, moe_cfg)                           # same weights, same function
    ... train (deepspeed / accelerate) ...
    state = export_hf_state_dict(model)                           # HF keys and layout (collective over EP)
    restore_moe_blocks(model); model.save_pretrained(path)        # or: put the HF blocks back and save

Block mapping (module path `transformers.models.<type>.modeling_<type>`; every HF block holds fused experts
`experts.gate_up_proj [E, 2I, D]` and `experts.down_proj [E, D, I]`, the layout `MoELayer` loads as is):

| model_type  | HF block                 | router            | shared expert                                  |
| ----------- | ------------------------ | ----------------- | ---------------------------------------------- |
| deepseek_v3 | `DeepseekV3MoE`          | sigmoid, groups   | `shared_experts` (I x n_shared_experts wide)   |
| mixtral     | `MixtralSparseMoeBlock`  | softmax, renorm   | none                                           |
| qwen2_moe   | `Qwen2MoeSparseMoeBlock` | softmax           | `shared_expert` x sigmoid(`shared_expert_gate`) |
| qwen3_moe   | `Qwen3MoeSparseMoeBlock` | softmax           | none                                           |

Parameter names inside a replaced block equal the HF names (`gate.weight`, `gate.e_score_correction_bias`,
`experts.*`, `shared_experts.*`, `shared_expert.*`, `shared_expert_gate.weight`), so at ep_size 1 the
model's state dict is the HF one plus a zero router bias for the softmax models. `MoELayer` cannot express
Qwen2-MoE's gated shared expert (its shared experts are ungated and I x num_shared_experts wide), so
`GatedSharedExpertMoE` adds it on top.

Routing math, HF versus dualmoe (`dualmoe.moe.router.route`): selection and gate values are the same
functions (softmax over all experts before top-k, renormalised for Mixtral and for Qwen with
norm_topk_prob; DeepSeek-V3's biased sigmoid selection with unbiased, renormalised, scaled gates).
Precision differs: HF computes DeepSeek-V3 routing in fp32, Mixtral/Qwen router logits in the model dtype
and the softmax in fp32; dualmoe computes logits and scores in fp32 (fp64 for an fp64 model). So in
fp32 the two agree to rounding, in bf16 near-tied experts can be chosen differently, and in fp64 HF's
gate values carry fp32 rounding. Aux loss: HF adds `router_aux_loss_coef` x a Switch loss pooled over
all layers, only with `output_router_logits`; dualmoe adds alpha x the same loss per layer (equal for one
MoE layer) as a gradient, not in the returned loss. `replace_moe_blocks` therefore turns HF's
`output_router_logits` off (HF would find no router outputs) and `restore_moe_blocks` turns it back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dualmoe.errors import ConfigError
from dualmoe.log import log_rank0
from pydantic import BaseModel
from torch import Tensor, nn
from torch.profiler import record_function

from .config import MoEConfig, parse_moe_config
from .layer import MoELayer, SharedExperts

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "GatedSharedExpertMoE",
    "HFSource",
    "export_hf_state_dict",
    "moe_config_from_hf",
    "replace_moe_blocks",
    "restore_moe_blocks",
]

logger = logging.getLogger(__name__)

_EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")
_BIAS_KEY = "gate.e_score_correction_bias"
# Keys that fix weight shapes: an override may restate them but not change them.
_SHAPE_KEYS = ("num_experts", "num_shared_experts")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Family:
    block: str
    """Class name of the HF sparse-MoE block."""
    score_func: Literal["sigmoid", "softmax"]
    router_bias: bool
    """The HF router holds `e_score_correction_bias`."""
    shared: Literal["none", "deepseek", "qwen2_gated"]


_FAMILIES: dict[str, _Family] = {
    "deepseek_v3": _Family(block="DeepseekV3MoE", score_func="sigmoid", router_bias=True, shared="deepseek"),
    "mixtral": _Family(block="MixtralSparseMoeBlock", score_func="softmax", router_bias=False, shared="none"),
    "qwen2_moe": _Family(block="Qwen2MoeSparseMoeBlock", score_func="softmax", router_bias=False,
                         shared="qwen2_gated"),
    "qwen3_moe": _Family(block="Qwen3MoeSparseMoeBlock", score_func="softmax", router_bias=False, shared="none"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)
_BY_BLOCK = {f.block: model_type for model_type, f in _FAMILIES.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class HFSource:
    """Where a replaced block came from; kept on the `MoELayer` as `hf_source` for export and restore."""

    model_type: str
    block_cls: type
    """The HF block class (rebuilt by `restore_moe_blocks`)."""
    config: Any
    """The HF config the block was built from."""
    dtypes: dict[str, torch.dtype]
    """dtype of every tensor of the HF block's state dict (export casts back to them)."""
    output_router_logits: bool
    """The model config's `output_router_logits` before replacement."""


class GatedSharedExpertMoE(MoELayer):
    """`MoELayer` plus Qwen2-MoE's gated shared expert: `y = moe(x) + sigmoid(x @ g.T) * shared_expert(x)`.

    Args:
        config: the `"moe"` section; `num_shared_experts` must be 0 (the gated expert replaces them).
        shared_hidden_size: the shared expert's FFN width (`shared_expert_intermediate_size`).
        **kwargs: `MoELayer`'s keyword arguments (hidden_size, ffn_hidden_size, layer_id, ep_group, dtype, ...).
    """

    def __init__(self, config: MoEConfig, *, shared_hidden_size: int, **kwargs: Any) -> None:
        if config.num_shared_experts:
            raise ConfigError(f"moe.num_shared_experts={config.num_shared_experts}: a Qwen2-MoE block has one gated "
                              "shared expert of its own width instead; set moe.num_shared_experts to 0")
        super().__init__(config, **kwargs)
        dtype, device = kwargs.get("dtype"), kwargs.get("device")
        self.shared_expert = SharedExperts(self.hidden_size, shared_hidden_size, dtype=dtype, device=device)
        self.shared_expert_gate = nn.Linear(self.hidden_size, 1, bias=False, dtype=dtype, device=device)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Routed experts plus the sigmoid-gated shared expert: `[..., D] -> [..., D]`."""
        routed = super().forward(hidden_states)
        with record_function("dualmoe/moe/shared"):
            gate = F.sigmoid(self.shared_expert_gate(hidden_states))
            return routed + gate * self.shared_expert(hidden_states)


# ---- config mapping ------------------------------------------------------------------------------------------
def _family(model_type: str | None) -> _Family:
    if model_type not in _FAMILIES:
        raise ConfigError(f"model_type={model_type!r}: no MoE mapping for this model; supported model types: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return _FAMILIES[model_type]


def _aux_alpha(hf_config: Any) -> float:
    # HF adds router_aux_loss_coef x aux only when output_router_logits is on (off by default).
    return float(hf_config.router_aux_loss_coef) if getattr(hf_config, "output_router_logits", False) else 0.0


def _check_hf_settings(hf_config: Any, model_type: str) -> None:
    """Reject HF settings MoELayer cannot reproduce."""
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{model_type}.hidden_act={act!r}: dualmoe experts are SwiGLU with SiLU; only "
                          "hidden_act='silu' maps onto MoELayer")
    jitter = getattr(hf_config, "router_jitter_noise", 0.0) or 0.0
    if jitter > 0:
        raise ConfigError(f"{model_type}.router_jitter_noise={jitter}: dualmoe's router has no input jitter; set "
                          "router_jitter_noise to 0 in the model config")


def _derived_fields(hf_config: Any, model_type: str) -> dict[str, Any]:
    """MoEConfig fields read off an HF config (before overrides)."""
    if model_type == "deepseek_v3":
        n_group = hf_config.n_group or 1
        return {"num_experts": hf_config.n_routed_experts, "top_k": hf_config.num_experts_per_tok,
                "num_shared_experts": hf_config.n_shared_experts,
                "router": {"score_func": "sigmoid", "n_group": n_group, "topk_group": hf_config.topk_group or n_group,
                           "norm_topk_prob": bool(hf_config.norm_topk_prob),
                           "routed_scaling_factor": float(hf_config.routed_scaling_factor)}}
    if model_type == "mixtral":
        num_experts, norm = hf_config.num_local_experts, True
    else:  # qwen2_moe, qwen3_moe
        num_experts, norm = hf_config.num_experts, bool(hf_config.norm_topk_prob)
    # No HF slot for a router bias: aux-loss-free balancing stays off unless asked for (export then refuses).
    return {"num_experts": num_experts, "top_k": hf_config.num_experts_per_tok, "num_shared_experts": 0,
            "router": {"score_func": "softmax", "norm_topk_prob": norm, "bias_update_rate": 0.0,
                       "aux_loss_alpha": _aux_alpha(hf_config)}}


def moe_config_from_hf(hf_config: Any, *, ep_size: int = 1, num_redundant_experts: int = 0,
                       **overrides: Any) -> MoEConfig:
    """The `"moe"` section matching an HF MoE model config, with dualmoe-only settings on top.

    Mapping: DeepSeek-V3 `n_routed_experts, num_experts_per_tok, n_shared_experts, n_group, topk_group,
    norm_topk_prob, routed_scaling_factor` (sigmoid scores, router bias kept and updated at the default
    rate); Mixtral `num_local_experts, num_experts_per_tok` (softmax, renormalised); Qwen2/Qwen3-MoE
    `num_experts, num_experts_per_tok, norm_topk_prob` (softmax). For the softmax models the bias update
    is off and `router.aux_loss_alpha = router_aux_loss_coef` when `output_router_logits` is on, else 0.

    Args:
        hf_config: a transformers config (`DeepseekV3Config`, `MixtralConfig`, `Qwen2MoeConfig`, `Qwen3MoeConfig`).
        ep_size: expert-parallel ranks.
        num_redundant_experts: extra physical slots (replicas).
        **overrides: other `"moe"` keys, e.g. the DeepSpeed JSON's section (`**ds_config["moe"]`); `router`
            and `eplb` dicts update the derived ones key by key. `num_experts`/`num_shared_experts` may be
            restated but not changed (they fix weight shapes).

    Returns:
        The validated config.

    Raises:
        ConfigError: an unsupported model type (the message lists the supported ones), an activation other
            than SiLU, Mixtral router jitter, a changed shape key, or an invalid resulting `"moe"` section.
    """
    model_type = getattr(hf_config, "model_type", None)
    fam = _family(model_type)
    _check_hf_settings(hf_config, model_type)
    fields = _derived_fields(hf_config, model_type)
    assert fields["router"]["score_func"] == fam.score_func
    fields.update(ep_size=ep_size, num_redundant_experts=num_redundant_experts)
    for key, value in overrides.items():
        if key in _SHAPE_KEYS and value != fields[key]:
            raise ConfigError(f"moe.{key}={value!r}: the {model_type} config has {key}={fields[key]} and the "
                              "weights have that shape; drop the key or set it to the model's value")
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if key in ("router", "eplb") and isinstance(value, Mapping):
            value = {**fields.get(key, {}), **value}
        fields[key] = value
    config = parse_moe_config({"moe": fields})
    assert config is not None
    return config


# ---- block replacement -----------------------------------------------------------------------------------------
def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, block, model_type) of every HF sparse-MoE block, in module order."""
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__name__ in _BY_BLOCK and cls.__module__.startswith("transformers."):
            found.append((name, module, _BY_BLOCK[cls.__name__]))
    return found


def _check_block(name: str, block: nn.Module, config: MoEConfig, fam: _Family) -> tuple[int, int]:
    """(hidden size D, expert FFN width I) of a block whose shapes fit `config`."""
    gate_up = getattr(getattr(block, "experts", None), "gate_up_proj", None)
    if not isinstance(gate_up, Tensor) or gate_up.dim() != 3:
        raise ConfigError(f"{name}: experts are not the fused [E, 2I, D] layout of transformers >= 5 (found "
                          f"{type(getattr(block, 'experts', None)).__name__}); dualmoe.moe.hf needs transformers>=5")
    num_experts, two_i, hidden = gate_up.shape
    if num_experts != config.num_experts:
        raise ConfigError(f"moe.num_experts={config.num_experts}: {name} has {num_experts} experts; set "
                          f"moe.num_experts={num_experts} (or build the config with moe_config_from_hf)")
    ffn = two_i // 2
    if fam.shared == "deepseek":
        width = block.shared_experts.gate_proj.out_features
        if width != ffn * config.num_shared_experts:
            raise ConfigError(f"moe.num_shared_experts={config.num_shared_experts}: {name}.shared_experts is {width} "
                              f"wide = {width // max(ffn, 1)} x the expert width {ffn}; set "
                              f"moe.num_shared_experts={width // max(ffn, 1)}")
    elif config.num_shared_experts:
        what = "one gated shared expert of its own width" if fam.shared == "qwen2_gated" else "no shared expert"
        raise ConfigError(f"moe.num_shared_experts={config.num_shared_experts}: {name} ({type(block).__name__}) "
                          f"has {what}, which num_shared_experts does not describe; set moe.num_shared_experts to 0")
    return hidden, ffn


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _build_layer(block: nn.Module, config: MoEConfig, fam: _Family, *, hidden: int, ffn: int, layer_id: int,
                 ep_group: dist.ProcessGroup | None) -> MoELayer:
    gate_up = block.experts.gate_up_proj
    # seed=0: the experts are overwritten at once, and a drawn seed would consume the caller's global RNG.
    kw = {"hidden_size": hidden, "ffn_hidden_size": ffn, "layer_id": layer_id, "ep_group": ep_group,
          "dtype": gate_up.dtype, "device": gate_up.device, "seed": 0}
    if fam.shared == "qwen2_gated":
        return GatedSharedExpertMoE(config, shared_hidden_size=block.shared_expert.gate_proj.out_features, **kw)
    return MoELayer(config, **kw)


def _load_block(layer: MoELayer, block: nn.Module, name: str, fam: _Family) -> None:
    """Copy the HF block's router, shared and expert weights into `layer` (experts: this rank's homes)."""
    state = dict(block.state_dict())
    gate_up, down = (state.pop(key) for key in _EXPERT_KEYS)
    missing, unexpected = layer.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _EXPERT_KEYS and not (k == _BIAS_KEY and not fam.router_bias)]
    if missing or unexpected:
        raise ConfigError(f"{name} ({type(block).__name__}): weights do not map onto {type(layer).__name__}; "
                          f"missing {missing}, unexpected {unexpected}")
    layer.load_expert_weights(gate_up, down)


def replace_moe_blocks(model: nn.Module, moe_config: MoEConfig | None = None, *,
                       ep_group: dist.ProcessGroup | None = None) -> int:
    """Swap every HF sparse-MoE block of `model` for a `MoELayer` holding the same weights.

    The i-th block found (module order) becomes MoE layer `layer_id=i`; dtype, device and train/eval mode
    follow the block. With ep_size > 1 each rank keeps only its home experts, so call this on every rank
    after torch.distributed is up (DeepSpeed's consecutive EP groups are assumed when `ep_group` is None;
    the engine binds the real group later through `set_deepspeed_parallelism`).

    Args:
        model: a transformers model (e.g. `DeepseekV3ForCausalLM`), modified in place.
        moe_config: the `"moe"` section; default `moe_config_from_hf(model.config)`.
        ep_group: the expert-parallel group (size `moe_config.ep_size`), if already known.

    Returns:
        The number of blocks replaced (0 when the model has none).

    Raises:
        ConfigError: an unsupported model type (when `moe_config` is None), shapes that do not fit
            `moe_config`, non-fused expert weights, an activation other than SiLU, router jitter, or
            ep_size > 1 with neither `ep_group` nor an initialised process group.
    """
    blocks = _find_blocks(model)
    if not blocks:
        return 0
    hf_config = getattr(model, "config", None)
    if moe_config is None:
        if hf_config is None:
            raise ConfigError(f"{type(model).__name__} has no .config to read the MoE settings from; pass moe_config")
        moe_config = moe_config_from_hf(hf_config)
    if moe_config.ep_size > 1 and ep_group is None and not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"moe.ep_size={moe_config.ep_size}: each rank loads only its home experts, so the EP rank "
                          "must be known; initialise torch.distributed (or pass ep_group) before replace_moe_blocks")
    if hf_config is not None:
        _check_hf_settings(hf_config, blocks[0][2])
    router_logits = bool(getattr(hf_config, "output_router_logits", False))
    # Check every block before swapping any, so a bad config leaves the model untouched.
    shapes = [_check_block(name, block, moe_config, _FAMILIES[model_type]) for name, block, model_type in blocks]
    for layer_id, ((name, block, model_type), (hidden, ffn)) in enumerate(zip(blocks, shapes, strict=True)):
        fam = _FAMILIES[model_type]
        layer = _build_layer(block, moe_config, fam, hidden=hidden, ffn=ffn, layer_id=layer_id, ep_group=ep_group)
        _load_block(layer, block, name, fam)
        layer.hf_source = HFSource(model_type=model_type, block_cls=type(block), config=hf_config,
                                   dtypes={k: v.dtype for k, v in block.state_dict().items()},
                                   output_router_logits=router_logits)
        layer.train(block.training)
        _set_submodule(model, name, layer)
    if router_logits:
        # HF would pool router logits it can no longer find; the layers add their own aux-loss gradient.
        hf_config.output_router_logits = False
        log_rank0(logger, "replace_moe_blocks: turned output_router_logits off; the aux loss now comes from "
                          "moe.router.aux_loss_alpha inside each MoE layer")
    return len(blocks)


# ---- back to HF ---------------------------------------------------------------------------------------------------
def _replaced_layers(model: nn.Module) -> list[tuple[str, MoELayer, HFSource]]:
    return [(name, m, m.hf_source) for name, m in model.named_modules()
            if isinstance(m, MoELayer) and isinstance(getattr(m, "hf_source", None), HFSource)]


def _block_state(layer: MoELayer, src: HFSource, name: str, *, drop_router_bias: bool) -> dict[str, Tensor]:
    """The layer's weights under the HF block's keys, all experts gathered (collective over EP), HF dtypes."""
    state = {k: v.detach() for k, v in layer.state_dict().items()}
    state[_EXPERT_KEYS[0]], state[_EXPERT_KEYS[1]] = layer.gather_expert_weights()
    if not _FAMILIES[src.model_type].router_bias:
        bias = state.pop(_BIAS_KEY)
        if bool(bias.ne(0).any()) and not drop_router_bias:
            raise ConfigError(f"{name}: the router bias is non-zero (moe.router.bias_update_rate > 0?) but "
                              f"{src.block_cls.__name__} has no bias, so the exported model would route "
                              "differently; train with bias_update_rate=0 or pass drop_router_bias=True")
    return {k: v.to(src.dtypes.get(k, v.dtype)) for k, v in state.items()}


def export_hf_state_dict(model: nn.Module, *, drop_router_bias: bool = False) -> dict[str, Tensor]:
    """`model.state_dict()` as the original HF model would have it: HF keys, all experts, HF dtypes.

    Collective over each replaced layer's EP group (every rank must call it; every rank gets the
    full experts). Load the result into the HF model class with `load_state_dict`, or use
    `restore_moe_blocks` and `save_pretrained`.

    Args:
        model: a model whose blocks `replace_moe_blocks` swapped.
        drop_router_bias: for Mixtral/Qwen, drop a non-zero router bias instead of raising.

    Returns:
        Name -> tensor (detached; expert tensors are fresh, the others share storage with the model).

    Raises:
        ConfigError: a softmax model with a non-zero router bias and `drop_router_bias` False.
    """
    layers = _replaced_layers(model)
    prefixes = tuple(f"{name}." for name, _, _ in layers)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for name, layer, src in layers:
        for key, value in _block_state(layer, src, name, drop_router_bias=drop_router_bias).items():
            state[f"{name}.{key}"] = value
    return state


def restore_moe_blocks(model: nn.Module, *, drop_router_bias: bool = False) -> int:
    """Put HF blocks, carrying the trained weights, back in place of the replaced `MoELayer`s.

    Afterwards the model is a plain transformers model again (`save_pretrained`, `generate`, hub
    checkpoint conversion all apply). Collective over EP like `export_hf_state_dict`.

    Returns:
        The number of blocks restored.

    Raises:
        ConfigError: as `export_hf_state_dict`.
    """
    layers = _replaced_layers(model)
    for name, layer, src in layers:
        state = _block_state(layer, src, name, drop_router_bias=drop_router_bias)
        with torch.device("meta"):
            block = src.block_cls(src.config)
        block.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{name}: {src.block_cls.__name__} tensors {left} are not in its state dict")
        block.train(layer.training)
        _set_submodule(model, name, block)
    for _, _, src in layers[:1]:
        if src.config is not None and src.output_router_logits:
            src.config.output_router_logits = True
    return len(layers)
