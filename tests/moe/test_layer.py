"""MoELayer: equal to transformers' DeepseekV3MoE, and at EP=2/4 (with and without DP, with and without
redundant slots) equal to a single-process reference over several optimizer steps (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dualmoe.errors import ConfigError, PlacementError
from dualmoe.moe.hooks import end_step
from dualmoe.moe.layer import MoELayer
from dualmoe.moe.placement import Placement
from dualmoe.moe.stats import LoadStats

from tests.harness import run_ranks
from tests.moe._common import (
    FFN,
    HIDDEN,
    copy_weights,
    dense_params,
    ep_groups,
    max_diff,
    moe_config,
    rank_batch,
    reference_layer,
)

TOL = 1e-10


# ---- single process ---------------------------------------------------------------------------------
def _hf_pair(norm: bool):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=FFN, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm,
                              n_shared_experts=2)
    hf = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
        hf.gate.e_score_correction_bias.normal_(0.0, 0.1)
    cfg = moe_config(e=16, k=4, n_group=4, topk_group=2, shared=2, r=3)
    cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"norm_topk_prob": norm})})
    ours = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, name).weight.copy_(getattr(hf.shared_experts, name).weight)
    ours.load_expert_weights(hf.experts.gate_up_proj, hf.experts.down_proj)
    return hf, ours


@pytest.mark.parametrize("norm", [True, False])
def test_layer_matches_transformers_deepseek_v3_moe(norm: bool) -> None:
    hf, ours = _hf_pair(norm)
    x = torch.randn(3, 7, HIDDEN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_hf, y = hf(x), ours(x2)
    grad = torch.randn_like(y)
    y_hf.backward(grad)
    y.backward(grad)
    ours.reduce_slot_grads()
    assert max_diff(y, y_hf) < 1e-5
    assert max_diff(x2.grad, x.grad) < 1e-5
    assert max_diff(ours.experts.gate_up_proj.grad, hf.experts.gate_up_proj.grad) < 1e-5
    assert max_diff(ours.experts.down_proj.grad, hf.experts.down_proj.grad) < 1e-5
    assert max_diff(ours.gate.weight.grad, hf.gate.weight.grad) < 1e-5
    assert max_diff(ours.shared_experts.up_proj.weight.grad, hf.shared_experts.up_proj.weight.grad) < 1e-5


def test_layer_aux_loss_gradient_equals_explicit_loss() -> None:
    from dualmoe.moe.router import route, seq_aux_loss, switch_aux_loss

    kw = {"score": "softmax", "n_group": 1, "topk_group": 1, "shared": 0, "rate": 0.0}
    ours = reference_layer(moe_config(aux=0.3, seq_aux=0.2, **kw))
    ref = reference_layer(moe_config(**kw))  # same weights, no aux loss inside
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    (ours(x) ** 2).sum().backward()
    logits = x.reshape(-1, HIDDEN) @ ref.gate.weight.t()
    ids, _, probs = route(logits, ref.gate.e_score_correction_bias, ref.gate.cfg, top_k=3)
    explicit = 0.3 * switch_aux_loss(probs, ids) + 0.2 * seq_aux_loss(probs.view(2, 6, -1), ids.view(2, 6, -1))
    ((ref(x) ** 2).sum() + explicit).backward()
    assert ours.aux_loss is not None and ref.aux_loss is None
    assert float(ours.aux_loss) == pytest.approx(float(explicit.detach()), rel=1e-12)
    assert max_diff(ours.gate.weight.grad, ref.gate.weight.grad) < 1e-12


def test_layer_set_placement_keeps_function_and_rejects_bad_shapes() -> None:
    cfg = moe_config(r=3)
    layer = reference_layer(cfg).double()
    ours = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, dtype=torch.float64)
    copy_weights(ours, layer)
    x = torch.randn(4, HIDDEN, dtype=torch.float64)
    before = ours(x)
    shuffled = Placement.from_physical_to_logical([7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 5], num_experts=8)
    ours.set_placement(shuffled)
    assert max_diff(ours(x), before) < 1e-12
    with pytest.raises(PlacementError, match=r"S=9"):
        ours.set_placement(Placement.identity(8, 9))
    ours.train()
    ours(x).sum().backward()
    with pytest.raises(RuntimeError, match="reduce_slot_grads first"):
        ours.set_placement(Placement.identity(8, 11))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_layer_counts_load_once_under_activation_checkpointing(use_reentrant: bool) -> None:
    torch.manual_seed(3)
    layer = MoELayer(moe_config(), hidden_size=HIDDEN, ffn_hidden_size=FFN, dtype=torch.float64)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    plain_load, plain_grad = layer.take_local_load(), x.grad.clone()
    x.grad = None
    layer.zero_grad(set_to_none=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    assert plain_load.sum() == x.shape[0] * x.shape[1] * layer.config.top_k
    assert torch.equal(layer.take_local_load(), plain_load)  # the recompute in backward is not counted again
    assert torch.equal(x.grad, plain_grad)


def test_layer_rejects_group_of_wrong_size() -> None:
    layer = MoELayer(moe_config(), hidden_size=HIDDEN, ffn_hidden_size=FFN)
    with pytest.raises(ConfigError, match=r"moe.ep_size=1 but the expert-parallel group"):
        layer.set_groups(ep_group=_FakeGroup())


class _FakeGroup:
    """Stands in for a two-rank process group (only its size is read before the check fails)."""

    def size(self) -> int:
        return 2


# ---- distributed: EP x DP vs the single-process reference over optimizer steps ---------------------------------
def _train(rank: int, world: int, cfg, ref_seed: int, steps: int) -> dict[str, float]:
    """Train a dist layer and the reference side by side; return the worst difference of each quantity."""
    ep_group, edp_group = ep_groups(world, cfg.ep_size)
    ref = reference_layer(cfg, seed=ref_seed)
    layer = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, ep_group=ep_group, dtype=torch.float64)
    copy_weights(layer, ref)
    opt, ref_opt = torch.optim.Adam(layer.parameters(), lr=0.02), torch.optim.Adam(ref.parameters(), lr=0.02)
    stats, ref_stats = LoadStats([layer]), LoadStats([ref], local_only=True)
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    for step in range(steps):
        x, t = rank_batch(rank, step=step)
        x.requires_grad_(True)
        y = layer(x)
        ((y * t).sum() / world).backward()
        layer.reduce_slot_grads()
        for p in dense_params(layer):
            dist.all_reduce(p.grad)
        for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
            dist.all_reduce(p.grad, group=edp_group)
        ref_y = []
        for r in range(world):  # the reference sees every rank's batch as one micro-batch each
            xr, tr = rank_batch(r, step=step)
            xr.requires_grad_(True)
            yr = ref(xr)
            ((yr * tr).sum() / world).backward()
            ref_y.append((yr, xr))
        ref.reduce_slot_grads()
        note("output", max_diff(y, ref_y[rank][0]))
        note("input_grad", max_diff(x.grad, ref_y[rank][1].grad))
        for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
            want = q.grad[layer.home_experts.start:layer.home_experts.stop] if name.startswith("experts.") else q.grad
            note(f"grad:{name}", max_diff(p.grad, want))
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
        end_step(layer, stats)
        end_step(ref, ref_stats)
        note("bias", max_diff(layer.gate.e_score_correction_bias, ref.gate.e_score_correction_bias))
    gate_up, down = layer.gather_expert_weights()
    note("final_gate_up", max_diff(gate_up, ref.experts.gate_up_proj))
    note("final_down", max_diff(down, ref.experts.down_proj))
    note("balancedness_valid", 0.0 if 0 < stats.balancedness() <= 1 else 1.0)
    return worst


def _cases(rank: int, world: int, cases: list) -> list[dict[str, float]]:
    torch.set_default_dtype(torch.float32)
    return [_train(rank, world, moe_config(**kw), seed, steps=3) for kw, seed in cases]


def _check(results: list[list[dict[str, float]]]) -> None:
    for rank_results in results:
        for case in rank_results:
            bad = {k: v for k, v in case.items() if not v < TOL}
            assert not bad, f"differences above {TOL}: {bad}"


@pytest.mark.dist
def test_layer_ep2_with_and_without_replicas_and_dp_only_equal_reference() -> None:
    cases = [({"ep": 2, "r": 0}, 0), ({"ep": 2, "r": 2}, 1), ({"ep": 1, "r": 1}, 2),
             ({"ep": 2, "r": 4, "score": "softmax", "n_group": 1, "topk_group": 1, "shared": 0}, 3)]
    _check(run_ranks(_cases, world_size=2, args=(cases,), timeout_s=120))


@pytest.mark.dist
def test_layer_ep4_and_ep2_dp2_with_replicas_equal_reference() -> None:
    cases = [({"ep": 4, "r": 0}, 0), ({"ep": 4, "r": 4}, 1), ({"ep": 2, "r": 2}, 2)]
    _check(run_ranks(_cases, world_size=4, args=(cases,), timeout_s=150))


def test_layer_bf16_runs_close_to_fp32_and_keeps_no_copy_of_home_experts() -> None:
    cfg = moe_config(r=2)
    ref = reference_layer(cfg)
    lo = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, dtype=torch.bfloat16)
    hi = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, dtype=torch.float32)
    for layer in (lo, hi):
        copy_weights(layer, ref)
    lo.gate.e_score_correction_bias.zero_()
    hi.gate.e_score_correction_bias.zero_()
    x = torch.randn(16, HIDDEN) * 0.1
    y_lo, y_hi = lo(x.bfloat16()), hi(x)
    assert y_lo.dtype == torch.bfloat16
    assert max_diff(y_lo, y_hi) < 0.05 * float(y_hi.detach().abs().max())
    y_lo.float().sum().backward()
    # One rank: every slot (replicas included) computes with its home parameter; grads are the parameter's.
    assert lo.experts.replica_gate_up.numel() == 0 and lo.experts._replica_grads == [None, None]
    assert lo.experts.gate_up_proj.grad.dtype == torch.bfloat16
    before = lo.experts.gate_up_proj.grad.clone()
    lo.reduce_slot_grads()
    assert torch.equal(lo.experts.gate_up_proj.grad, before)


# ---- the step boundary costs nothing with R = 0; placement switches keep the function --------------------------
def _boundary_and_switch(rank: int, world: int) -> dict[str, float]:
    import random

    calls: list[int] = []
    real = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_to_all_single = counting
    out: dict[str, float] = {}
    for r in (0, 2):
        cfg = moe_config(ep=2, r=r)
        ref = reference_layer(cfg)
        layer = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, ep_group=dist.group.WORLD, dtype=torch.float64)
        copy_weights(layer, ref)
        x, t = rank_batch(rank)
        (layer(x) * t).sum().backward()
        calls.clear()
        layer.reduce_slot_grads()
        layer.refresh_slots()
        out[f"boundary_collectives_r{r}"] = len(calls)
        out[f"expert_buffer_bytes_r{r}"] = sum(b.numel() * b.element_size() for b in layer.experts.buffers())
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        rng = random.Random(7)  # the same placements on both ranks
        for mode in ("changed", "all", "lazy", "changed"):
            p2l = list(range(8)) + [rng.randrange(8) for _ in range(2)]
            rng.shuffle(p2l)
            layer.set_placement(Placement.from_physical_to_logical(p2l, num_experts=8, num_ranks=2), refresh=mode)
            out[f"switch_{mode}"] = max(out.get(f"switch_{mode}", 0.0), max_diff(layer(x), before))
    return out


@pytest.mark.dist
def test_layer_r0_boundary_has_no_collective_and_no_buffer_and_switches_keep_the_function() -> None:
    for result in run_ranks(_boundary_and_switch, world_size=2, timeout_s=120):
        assert result["boundary_collectives_r0"] == 0 and result["expert_buffer_bytes_r0"] == 0, result
        assert result["boundary_collectives_r2"] == 4 and result["expert_buffer_bytes_r2"] > 0, result
        assert all(v < 1e-12 for k, v in result.items() if k.startswith("switch_")), result


def _overlap_vs_blocking_refresh(rank: int, world: int) -> dict[str, object]:
    torch.set_default_dtype(torch.float32)
    ep_group, _ = ep_groups(world, world)
    ref = reference_layer(moe_config(ep=world, r=2 * world), seed=4)
    layers, outputs, seen = [], [], {}
    for overlap in (True, False):
        cfg = moe_config(ep=world, r=2 * world).model_copy(update={"overlap_refresh": overlap})
        layer = MoELayer(cfg, hidden_size=HIDDEN, ffn_hidden_size=FFN, ep_group=ep_group, dtype=torch.float64)
        copy_weights(layer, ref)
        layers.append(layer)
    for layer in layers:
        opt, stats, out = torch.optim.SGD(layer.parameters(), lr=0.1), LoadStats([layer]), []
        for step in range(3):
            for micro in range(2):  # the replica grads of both micro-batches go home after the second
                x, t = rank_batch(rank, step=step, seed=1 + micro)
                y = layer(x)
                if layer.config.overlap_refresh and step and not micro:
                    seen["waited_in_forward"] = not layer.experts.refresh_in_flight
                if micro == 1:
                    layer.arm_slot_grad_reduce()  # a no-op without overlap_refresh
                ((y * t).sum()).backward()
                if layer.config.overlap_refresh:
                    seen.setdefault("sent_during_backward", []).append(bool(layer.experts._reduce_inflight))
                out.append(y.detach().clone())
            layer.reduce_slot_grads()
            opt.step()
            opt.zero_grad()
            end_step(layer, stats)
            if layer.config.overlap_refresh:
                seen["in_flight_after_step"] = layer.experts.refresh_in_flight
        gate_up, down = layer.gather_expert_weights()
        outputs.append((torch.stack(out), gate_up, down, torch.stack(list(layer.experts.replicas()[0]))))
    seen["separate_group"] = (layers[0].refresh_group is not None and layers[0].refresh_group is not ep_group
                              and layers[1].refresh_group is None)
    seen["bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    layer = layers[0]  # a backward after the replica grads left is refused, not lost
    layer.arm_slot_grad_reduce()
    layer(rank_batch(rank, step=9)[0]).sum().backward()
    try:
        layer(rank_batch(rank, step=10)[0]).sum().backward()
    except RuntimeError as err:
        seen["late_backward_refused"] = "already sent home" in str(err) or "were sent home" in str(err)
    layer.reduce_slot_grads()
    return seen


@pytest.mark.dist
def test_layer_overlapped_refresh_and_early_grad_reduce_equal_the_blocking_ones() -> None:
    for seen in run_ranks(_overlap_vs_blocking_refresh, world_size=2, timeout_s=120):
        assert seen == {"waited_in_forward": True, "in_flight_after_step": True, "separate_group": True,
                        "sent_during_backward": [False, True] * 3, "bitwise_equal": True,
                        "late_backward_refused": True}, seen
