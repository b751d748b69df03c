"""dualmoe.moe.hf: HF MoE blocks swapped for MoELayer compute the same logits and gradients as the HF model
(DeepSeek-V3, Mixtral, Qwen2-MoE, Qwen3-MoE; fp32 and fp64), export/restore round-trips trained weights
back to HF, config mapping and its errors, and an EP=2 model trained through accelerate + DeepSpeed equals
plain HF training. Tiny configs come from configs/hf/; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from dualmoe.errors import ConfigError
from dualmoe.moe.config import parse_moe_config
from dualmoe.moe.hf import (
    GatedSharedExpertMoE,
    export_hf_state_dict,
    moe_config_from_hf,
    replace_moe_blocks,
    restore_moe_blocks,
)
from dualmoe.moe.hooks import reduce_slot_grads, refresh_slots
from dualmoe.moe.layer import MoELayer
from transformers import AutoConfig, AutoModelForCausalLM

from tests.harness import run_ranks

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("deepseek_v3", "mixtral", "qwen2_moe", "qwen3_moe")
HF_BLOCKS = {"deepseek_v3": "DeepseekV3MoE", "mixtral": "MixtralSparseMoeBlock",
             "qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock"}
NUM_MOE_LAYERS = {"deepseek_v3": 2, "mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2}  # dense layers are kept
# Measured worst cases over the families (logits ~2 in size: abs diff; grads: diff / the tensor's max |grad|):
# fp32 4.8e-7 / 8.9e-7; fp64 2.3e-7 / 4.3e-7. fp64 is bounded by HF's router, which rounds scores to fp32 even in
# an fp64 model while dualmoe routes in fp64 (with dualmoe's router held in fp32 too, DeepSeek-V3 agrees exactly).
TOL = {torch.float32: (2e-6, 1e-5), torch.float64: (1e-6, 1e-5)}


def _hf_config(family: str, **changes):
    return AutoConfig.from_pretrained(ROOT / "configs" / "hf" / f"{family}_tiny.json", **changes)


def _hf_model(family: str, dtype: torch.dtype = torch.float32, **changes):
    """Tiny random HF model in train mode; routers get large weights (and DeepSeek a non-zero bias) so the
    routing is far from uniform; fp64 runs HF's eager experts loop (its grouped_mm has no fp64 kernel)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(family, **changes)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            elif "norm" not in name:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    if dtype == torch.float64:
        model.set_experts_implementation("eager")
    return model.train()


def _ids(config, seed: int = 1, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def _worst_grad(ours: torch.nn.Module, ref: torch.nn.Module) -> float:
    """Largest |grad difference| / max |reference grad| over all parameters, matched by name."""
    mine = dict(ours.named_parameters())
    worst = 0.0
    for name, p in ref.named_parameters():
        assert mine[name].grad is not None, f"{name} got no gradient"
        worst = max(worst, _diff(mine[name].grad, p.grad) / max(float(p.grad.abs().max()), 1e-30))
    return worst


# ---- function and gradients equal HF ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_replace_moe_blocks_matches_hf_logits_and_grads(family: str, dtype: torch.dtype) -> None:
    hf = _hf_model(family, dtype)
    ours = copy.deepcopy(hf)
    # Two redundant slots: replicas must not change the function.
    count = replace_moe_blocks(ours, moe_config_from_hf(hf.config, num_redundant_experts=2))
    assert count == NUM_MOE_LAYERS[family]
    layers = [m for m in ours.modules() if isinstance(m, MoELayer)]
    assert len(layers) == count and not any(type(m).__name__ == HF_BLOCKS[family] for m in ours.modules())
    assert all(isinstance(m, GatedSharedExpertMoE) == (family == "qwen2_moe") for m in layers)
    assert set(dict(ours.named_parameters())) == set(dict(hf.named_parameters()))
    ids = _ids(hf.config)
    ref_out, out = hf(ids, labels=ids), ours(ids, labels=ids)
    ref_out.loss.backward()
    out.loss.backward()
    reduce_slot_grads(ours)  # expert gradients land in slot buffers until the step boundary
    logit_tol, grad_tol = TOL[dtype]
    assert _diff(out.logits, ref_out.logits) < logit_tol
    assert _worst_grad(ours, hf) < grad_tol


def test_replace_moe_blocks_deepseek_v3_fp64_with_fp32_router_matches_hf_exactly() -> None:
    # HF's DeepseekV3TopkRouter computes in fp32 whatever the model dtype; an fp32 router weight makes
    # dualmoe's Router do the same, leaving only fp64 summation-order differences.
    hf = _hf_model("deepseek_v3", torch.float64)
    ours = copy.deepcopy(hf)
    replace_moe_blocks(ours, moe_config_from_hf(hf.config, num_redundant_experts=2))
    for layer in (m for m in ours.modules() if isinstance(m, MoELayer)):
        layer.gate.weight.data = layer.gate.weight.data.float()
    ids = _ids(hf.config)
    ref_out, out = hf(ids, labels=ids), ours(ids, labels=ids)
    ref_out.loss.backward()
    out.loss.backward()
    reduce_slot_grads(ours)
    assert _diff(out.logits, ref_out.logits) < 1e-12
    assert _worst_grad(ours, hf) < 1e-12


def test_replace_moe_blocks_aux_loss_gradient_matches_hf_single_moe_layer() -> None:
    # HF pools its Switch loss over layers; with one MoE layer it equals dualmoe's per-layer loss.
    hf = _hf_model("mixtral", num_hidden_layers=1, output_router_logits=True, router_aux_loss_coef=0.3)
    ours = copy.deepcopy(hf)
    config = moe_config_from_hf(hf.config)
    assert config.router.aux_loss_alpha == 0.3
    replace_moe_blocks(ours, config)
    assert ours.config.output_router_logits is False and hf.config.output_router_logits is True
    ids = _ids(hf.config)
    ref_out, out = hf(ids, labels=ids), ours(ids, labels=ids)
    ref_out.loss.backward()  # HF: CE + 0.3 x aux
    out.loss.backward()  # ours: CE, the aux gradient rides on the layer output
    reduce_slot_grads(ours)
    layer = ours.model.layers[0].mlp
    assert float(layer.aux_loss) == pytest.approx(0.3 * float(ref_out.aux_loss.detach()), rel=1e-5)
    assert _worst_grad(ours, hf) < 1e-5
    without = copy.deepcopy(hf)
    without.config.output_router_logits = False
    replace_moe_blocks(without)
    assert without.model.layers[0].mlp.config.router.aux_loss_alpha == 0.0


# ---- export / restore ------------------------------------------------------------------------------------------
def _train_one_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, labels=ids).loss.backward()
    reduce_slot_grads(model)
    opt.step()
    refresh_slots(model)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        if layer.config.router.bias_update_rate:  # DeepSeek: a trained, non-zero router bias travels too
            layer.update_bias(torch.arange(layer.num_experts))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_hf_state_dict_round_trips_trained_weights(family: str) -> None:
    hf = _hf_model(family)
    ours = copy.deepcopy(hf)
    replace_moe_blocks(ours, moe_config_from_hf(hf.config, num_redundant_experts=1))
    _train_one_step(ours, _ids(hf.config, seed=2))
    state = export_hf_state_dict(ours)
    ref_state = hf.state_dict()
    assert set(state) == set(ref_state)
    for key, value in ref_state.items():
        assert state[key].shape == value.shape and state[key].dtype == value.dtype, key
    assert max(_diff(state[k], ref_state[k]) for k in state if ".experts." in k) > 1e-3  # training moved them
    fresh = _hf_model(family)
    fresh.load_state_dict(state, strict=True)
    ids = _ids(hf.config, seed=3)
    with torch.no_grad():
        assert _diff(fresh(ids).logits, ours(ids).logits) < 2e-6


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_restore_moe_blocks_gives_hf_model_that_saves_and_loads(family: str, tmp_path: Path) -> None:
    hf = _hf_model(family, output_router_logits=family == "mixtral")
    ours = copy.deepcopy(hf)
    replace_moe_blocks(ours)
    _train_one_step(ours, _ids(hf.config, seed=2))
    ids = _ids(hf.config, seed=3)
    with torch.no_grad():
        trained = ours(ids).logits
    assert restore_moe_blocks(ours) == NUM_MOE_LAYERS[family]
    assert not any(isinstance(m, MoELayer) for m in ours.modules())
    assert sum(type(m).__name__ == HF_BLOCKS[family] for m in ours.modules()) == NUM_MOE_LAYERS[family]
    assert ours.config.output_router_logits is (family == "mixtral")
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert _diff(ours(ids).logits, trained) < 2e-6
        assert _diff(loaded(ids).logits, trained) < 2e-6


def test_export_refuses_router_bias_that_hf_cannot_hold() -> None:
    hf = _hf_model("mixtral")
    replace_moe_blocks(hf, moe_config_from_hf(hf.config, router={"bias_update_rate": 0.01}))
    for layer in (m for m in hf.modules() if isinstance(m, MoELayer)):
        layer.update_bias(torch.arange(layer.num_experts))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp: the router bias is non-zero.*"
                                          r"MixtralSparseMoeBlock has no bias"):
        export_hf_state_dict(hf)
    state = export_hf_state_dict(hf, drop_router_bias=True)
    assert not any(k.endswith("e_score_correction_bias") for k in state)


# ---- config mapping ------------------------------------------------------------------------------------------------
def test_moe_config_from_hf_maps_deepseek_v3() -> None:
    cfg = moe_config_from_hf(_hf_config("deepseek_v3"), ep_size=2, num_redundant_experts=2)
    assert (cfg.num_experts, cfg.top_k, cfg.num_shared_experts, cfg.ep_size, cfg.num_slots) == (8, 3, 1, 2, 10)
    r = cfg.router
    assert (r.score_func, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor) == (
        "sigmoid", 4, 2, True, 2.5)
    assert r.bias_update_rate == 1e-3 and r.aux_loss_alpha == 0.0


@pytest.mark.parametrize(("family", "norm", "top_k"), [("mixtral", True, 2), ("qwen2_moe", False, 2),
                                                       ("qwen3_moe", True, 2)])
def test_moe_config_from_hf_maps_softmax_models(family: str, norm: bool, top_k: int) -> None:
    cfg = moe_config_from_hf(_hf_config(family, output_router_logits=True, router_aux_loss_coef=0.02))
    r = cfg.router
    assert (cfg.num_experts, cfg.top_k, cfg.num_shared_experts) == (8, top_k, 0)
    assert (r.score_func, r.n_group, r.norm_topk_prob, r.routed_scaling_factor) == ("softmax", 1, norm, 1.0)
    assert (r.bias_update_rate, r.aux_loss_alpha) == (0.0, 0.02)
    assert moe_config_from_hf(_hf_config(family)).router.aux_loss_alpha == 0.0  # HF adds no aux loss then


def test_moe_config_from_hf_merges_overrides_and_the_ds_json_section() -> None:
    hf_config = _hf_config("deepseek_v3")
    cfg = moe_config_from_hf(hf_config, num_experts=8, router={"bias_update_rate": 0.0, "seq_aux_alpha": 1e-4},
                             eplb={"enabled": True, "interval": 5})
    assert cfg.router.n_group == 4 and cfg.router.bias_update_rate == 0.0 and cfg.router.seq_aux_alpha == 1e-4
    assert cfg.eplb.enabled and cfg.eplb.interval == 5
    ds_config = json.loads((ROOT / "configs" / "ds_moe_deepseek_v3_tiny.json").read_text())
    assert moe_config_from_hf(hf_config, **ds_config["moe"]) == parse_moe_config(ds_config)


def test_moe_config_from_hf_rejects_unknown_model_type() -> None:
    from transformers import LlamaConfig

    with pytest.raises(ConfigError, match=r"model_type='llama'.*supported model types: deepseek_v3, mixtral, "
                                          r"qwen2_moe, qwen3_moe"):
        moe_config_from_hf(LlamaConfig())


def test_moe_config_from_hf_rejects_changed_shape_and_bad_values() -> None:
    hf_config = _hf_config("deepseek_v3")
    with pytest.raises(ConfigError, match=r"moe\.num_experts=16: the deepseek_v3 config has num_experts=8"):
        moe_config_from_hf(hf_config, num_experts=16)
    with pytest.raises(ConfigError, match=r"moe\.router\.n_group=3"):
        moe_config_from_hf(hf_config, router={"n_group": 3})
    with pytest.raises(ConfigError, match=r"moe\.ep_size=3"):
        moe_config_from_hf(hf_config, ep_size=3)
    with pytest.raises(ConfigError, match=r"mixtral\.router_jitter_noise=0\.1"):
        moe_config_from_hf(_hf_config("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ConfigError, match=r"qwen3_moe\.hidden_act='gelu'"):
        moe_config_from_hf(_hf_config("qwen3_moe", hidden_act="gelu"))


def test_replace_moe_blocks_rejects_configs_that_do_not_fit_the_weights() -> None:
    hf = _hf_model("deepseek_v3")
    base = moe_config_from_hf(hf.config)
    with pytest.raises(ConfigError, match=r"moe\.num_experts=16: model\.layers\.1\.mlp has 8 experts"):
        replace_moe_blocks(hf, base.model_copy(update={"num_experts": 16, "top_k": 2}))
    with pytest.raises(ConfigError, match=r"moe\.num_shared_experts=2: model\.layers\.1\.mlp\.shared_experts is 16"):
        replace_moe_blocks(hf, base.model_copy(update={"num_shared_experts": 2}))
    with pytest.raises(ConfigError, match=r"moe\.ep_size=2: each rank loads only its home experts"):
        replace_moe_blocks(hf, moe_config_from_hf(hf.config, ep_size=2))
    qwen3 = _hf_model("qwen3_moe")
    with pytest.raises(ConfigError, match=r"moe\.num_shared_experts=1: .*Qwen3MoeSparseMoeBlock\) has no shared"):
        replace_moe_blocks(qwen3, moe_config_from_hf(qwen3.config).model_copy(update={"num_shared_experts": 1}))
    qwen2 = _hf_model("qwen2_moe")
    with pytest.raises(ConfigError, match=r"Qwen2MoeSparseMoeBlock\) has one gated shared expert"):
        replace_moe_blocks(qwen2, moe_config_from_hf(qwen2.config, num_shared_experts=0).model_copy(
            update={"num_shared_experts": 1}))
    jittery = _hf_model("mixtral")
    jittery.config.router_jitter_noise = 0.01
    with pytest.raises(ConfigError, match=r"mixtral\.router_jitter_noise=0\.01"):
        replace_moe_blocks(jittery, moe_config_from_hf(_hf_config("mixtral")))
    assert any(type(m).__name__ == "DeepseekV3MoE" for m in hf.modules())  # nothing swapped on error


def test_replace_moe_blocks_leaves_dense_models_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert replace_moe_blocks(dense) == 0


# ---- EP=2 through DeepSpeed and accelerate (2 gloo ranks) -------------------------------------------------------
LR = 0.2


def _reference_losses(ref, batches, world: int, clip: float) -> list[float]:
    """Plain HF training on every rank's batch (mean loss, clipped like DeepSpeed, SGD)."""
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    losses = []
    for step_batches in batches:
        loss = sum(ref(input_ids=b, labels=b).loss for b in step_batches) / world
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _compare(engine, train_step, ref, ref_losses, batches, rank: int, world: int) -> dict[str, float]:
    with torch.no_grad():  # the engine bound the EP group; each rank holds half of the experts
        first = batches[0][rank]
        out = {"logits": _diff(engine(first).logits, _hf_model("deepseek_v3")(first).logits), "loss": 0.0}
    for step_batches, ref_loss in zip(batches, ref_losses, strict=True):
        mean = train_step(step_batches[rank]).detach().clone()
        torch.distributed.all_reduce(mean)
        out["loss"] = max(out["loss"], abs(float(mean) / world - ref_loss))
    state, ref_state = export_hf_state_dict(engine.module), ref.state_dict()
    assert set(state) == set(ref_state)
    out["weights"] = max(_diff(state[k], ref_state[k]) for k in ref_state)
    out["clipping"] = float(engine.gradient_clipping())  # the reference clips the same way
    out["engine_is_moe"] = float(type(engine).__name__ == "MoEDeepSpeedEngine" and engine.has_moe_layers)
    return out


def _train_ep2(rank: int, world: int) -> dict[str, dict[str, float]]:
    """The tiny DeepSeek-V3 with the tiny DS JSON (EP2, 2 redundant slots, ZeRO-1) trained two steps by
    `dualmoe.initialize` and by accelerate (through `dualmoe.install()`), each against plain HF training."""
    import dualmoe
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.moe.utils import configure_moe_param_groups

    ds_config = json.loads((ROOT / "configs" / "ds_moe_deepseek_v3_tiny.json").read_text())
    ds_config["moe"]["router"]["bias_update_rate"] = 0.0  # plain HF has no bias update to compare against
    ref = _hf_model("deepseek_v3")
    batches = [[_ids(ref.config, seed=10 * step + r, shape=(2, 8)) for r in range(world)] for step in range(2)]
    ref_losses = _reference_losses(ref, batches, world, ds_config["gradient_clipping"])
    init = _hf_model("deepseek_v3").state_dict()
    results = {"experts_moved": {"max": max(_diff(ref.state_dict()[k], init[k]) for k in init if ".experts." in k)}}

    def swapped():
        model = _hf_model("deepseek_v3")
        assert replace_moe_blocks(model, moe_config_from_hf(model.config, **ds_config["moe"])) == 2
        return model, configure_moe_param_groups(list(model.parameters()))

    model, groups = swapped()
    engine, _, _, _ = dualmoe.initialize(model=model, model_parameters=groups, config=ds_config,
                                         optimizer=lambda g: torch.optim.SGD(g, lr=LR))

    def ds_step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss

    results["deepspeed"] = _compare(engine, ds_step, ref, ref_losses, batches, rank, world)

    model, groups = swapped()
    dualmoe.install()  # accelerate looks deepspeed.initialize up at call time
    try:
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
        engine, optimizer = accelerator.prepare(model, torch.optim.SGD(groups, lr=LR))
    finally:
        dualmoe.uninstall()

    def accelerate_step(ids):
        loss = engine(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    results["accelerate"] = _compare(engine, accelerate_step, ref, ref_losses, batches, rank, world)
    return results


@pytest.fixture(scope="module")
def trained_ep2() -> list[dict[str, dict[str, float]]]:
    return run_ranks(_train_ep2, world_size=2, timeout_s=150)


@pytest.mark.dist
@pytest.mark.parametrize("path", ["deepspeed", "accelerate"])
def test_replace_moe_blocks_ep2_matches_hf_logits(trained_ep2, path: str) -> None:
    assert all(r[path]["logits"] < 2e-6 for r in trained_ep2)


@pytest.mark.dist
@pytest.mark.parametrize("path", ["deepspeed", "accelerate"])
def test_ep2_zero1_training_equals_plain_hf_and_exports_all_experts(trained_ep2, path: str) -> None:
    for r in trained_ep2:
        assert r["experts_moved"]["max"] > 1e-3  # the two steps really train the experts
        assert r[path]["engine_is_moe"] == 1.0 and r[path]["clipping"] == 1.0
        assert r[path]["loss"] < 1e-5
        assert r[path]["weights"] < 1e-5  # export gathers both ranks' home experts
