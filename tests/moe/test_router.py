"""Router: DeepSeek-V3 semantics (vs transformers), group limiting, softmax/Mixtral, aux losses, bias balancing."""

from __future__ import annotations

import pytest
import torch
from dualmoe.moe.config import MoEConfig, RouterConfig
from dualmoe.moe.router import Router, group_limited_topk, route, seq_aux_loss, switch_aux_loss, updated_bias


def _router(e: int, k: int, h: int = 16, **router) -> Router:
    return Router(MoEConfig(num_experts=e, top_k=k, router=RouterConfig(**router)), h)


@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_transformers_deepseek_v3_topk_router(norm: bool) -> None:
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    hf = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=16, n_routed_experts=32, num_experts_per_tok=6, n_group=8,
                                               topk_group=3, routed_scaling_factor=2.5, norm_topk_prob=norm))
    ours = _router(32, 6, n_group=8, topk_group=3, routed_scaling_factor=2.5, norm_topk_prob=norm)
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.normal_(0, 0.2)
        ours.weight.copy_(hf.weight)
        ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(64, 16)
    _, hf_w, hf_ids = hf(x)
    out = ours(x)
    hf_order, our_order = hf_ids.argsort(-1), out.topk_ids.argsort(-1)
    assert torch.equal(hf_ids.gather(1, hf_order), out.topk_ids.gather(1, our_order))
    torch.testing.assert_close(out.topk_weights.gather(1, our_order), hf_w.gather(1, hf_order))


@pytest.mark.parametrize("seed", range(25))
def test_router_group_limited_topk_never_leaves_the_kept_groups(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_group = int(torch.randint(2, 9, (), generator=gen))
    per_group = int(torch.randint(2, 6, (), generator=gen))
    topk_group = int(torch.randint(1, n_group + 1, (), generator=gen))
    top_k = int(torch.randint(1, topk_group * per_group + 1, (), generator=gen))
    choice = torch.randn(40, n_group * per_group, generator=gen, dtype=torch.float64)
    ids = group_limited_topk(choice, n_group=n_group, topk_group=topk_group, top_k=top_k)
    group_score = choice.view(40, n_group, per_group).topk(2, dim=-1).values.sum(-1)
    for t in range(40):
        kept = set(group_score[t].topk(topk_group).indices.tolist())
        assert {int(i) // per_group for i in ids[t]} <= kept
        allowed = [i for i in range(n_group * per_group) if i // per_group in kept]
        best = sorted(allowed, key=lambda i: -float(choice[t, i]))[:top_k]
        assert sorted(ids[t].tolist()) == sorted(best)


def test_router_softmax_matches_mixtral_router_and_aux_loss() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(1)
    ours = _router(8, 2, score_func="softmax", bias_update_rate=0.0, aux_loss_alpha=1.0)
    x = torch.randn(50, 16)
    out = ours(x)
    logits = x @ ours.weight.t()
    probs = logits.softmax(-1)
    top, ids = probs.topk(2, dim=-1)
    order = out.topk_ids.argsort(-1)
    assert torch.equal(out.topk_ids.gather(1, order), ids.gather(1, ids.argsort(-1)))
    torch.testing.assert_close(out.topk_weights.gather(1, order), (top / top.sum(-1, keepdim=True)).gather(
        1, ids.argsort(-1)))
    expected = load_balancing_loss_func((logits.detach(),), num_experts=8, top_k=2)
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    ours.eval()
    assert ours(x).aux_loss is None


def test_router_seq_aux_loss_matches_paper_formula() -> None:
    torch.manual_seed(2)
    b, t, e, k = 3, 7, 6, 2
    scores = torch.rand(b, t, e, dtype=torch.float64)
    probs = scores / scores.sum(-1, keepdim=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(b * t)]).view(b, t, k)
    want = 0.0
    for s in range(b):
        for i in range(e):
            f = e / (k * t) * float((ids[s] == i).sum())
            want += f * float(probs[s, :, i].mean())
    assert float(seq_aux_loss(probs, ids)) == pytest.approx(want / b, rel=1e-12)
    flat = ids.view(-1, k)
    assert float(switch_aux_loss(probs.view(-1, e), flat)) == pytest.approx(
        e * sum(float((flat == i).sum()) / (b * t) * float(probs.view(-1, e)[:, i].mean()) for i in range(e)))


def test_router_updated_bias_sign_and_off_switch() -> None:
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    assert torch.equal(updated_bias(bias, load, 0.1), torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert updated_bias(bias, load, 0.0) is bias
    assert torch.equal(updated_bias(bias, torch.full((4,), 3.0), 0.1), bias)


def test_router_bias_update_drives_skewed_router_to_balance() -> None:
    """Sign updates oscillate around balance (bang-bang), so judge the load averaged over the last steps."""
    torch.manual_seed(3)
    router = _router(16, 2, h=8, n_group=4, topk_group=2, bias_update_rate=0.01)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[:3] += 0.5  # experts 0-2 win for inputs with a positive mean
    gen = torch.Generator().manual_seed(4)
    loads = []
    for _ in range(300):
        with torch.no_grad():
            x = torch.randn(1024, 8, generator=gen) * 0.5 + 0.3
            loads.append(torch.bincount(router(x).topk_ids.reshape(-1), minlength=16).double())
        router.update_bias(loads[-1])
    first, recent = loads[0], torch.stack(loads[-50:]).sum(0)
    assert float(first.max() / first.mean()) > 4.0
    assert float(recent.max() / recent.mean()) < 1.1
    assert float(router.e_score_correction_bias[:3].max()) < 0 < float(router.e_score_correction_bias[3:].min())


def test_router_bias_stays_fp32_when_module_is_cast() -> None:
    router = _router(8, 2).bfloat16()
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    router.update_bias(torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1]))
    assert float(router.e_score_correction_bias[0]) == pytest.approx(-1e-3)
    ids, weights, _ = route(torch.randn(5, 8, dtype=torch.float64), router.e_score_correction_bias,
                            router.cfg, top_k=2)
    assert ids.shape == (5, 2) and weights.dtype == torch.float64
