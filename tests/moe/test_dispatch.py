"""Dispatch/combine: replica choice splits evenly, the staged path is a permutation round trip, and the
all-to-all (with empty splits) moves rows and gradients to the right ranks."""

from __future__ import annotations

import pytest
import torch
from dualmoe.moe.dispatch import TokenDispatcher, _regroup_permutation, choose_replica_slots
from dualmoe.moe.placement import Placement

from tests.harness import run_ranks


def _maps(placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(placement.logical_to_physical), torch.tensor(placement.replica_count)


@pytest.mark.parametrize("rotation", [0, 1, 3])
def test_dispatch_replica_choice_splits_each_expert_evenly(rotation: int) -> None:
    placement = Placement.from_physical_to_logical([0, 1, 2, 0, 0, 1, 3, 2], num_experts=4)
    l2p, counts = _maps(placement)
    ids = torch.randint(0, 4, (101, 3), generator=torch.Generator().manual_seed(rotation))
    slots = choose_replica_slots(ids, l2p, counts, rotation=rotation)
    assert torch.equal(torch.tensor(placement.physical_to_logical)[slots], ids)
    per_slot = torch.bincount(slots.reshape(-1), minlength=8)
    for expert in range(4):
        mine = per_slot[list(placement.logical_to_physical[expert][:placement.replica_count[expert]])]
        assert int(mine.max() - mine.min()) <= 1
    assert torch.equal(slots, choose_replica_slots(ids, l2p, counts, rotation=rotation))


def test_dispatch_replica_choice_without_replicas_is_the_map() -> None:
    placement = Placement.from_physical_to_logical([3, 1, 0, 2], num_experts=4)
    l2p, counts = _maps(placement)
    ids = torch.randint(0, 4, (9, 2))
    assert torch.equal(choose_replica_slots(ids, l2p, counts), l2p[ids, 0])


def _replica_slots_reference(ids: torch.Tensor, l2p: torch.Tensor, counts: torch.Tensor, rotation: int) -> torch.Tensor:
    """The bincount formulation `choose_replica_slots` had before it went sync-free."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    per_expert = torch.bincount(flat, minlength=counts.numel())
    rank_in_expert = torch.arange(flat.numel()) - (torch.cumsum(per_expert, 0) - per_expert)[sorted_ids]
    slots = torch.empty_like(flat)
    slots[order] = l2p[sorted_ids, (rank_in_expert + rotation) % counts[sorted_ids]]
    return slots.view_as(ids)


@pytest.mark.parametrize("rotation", [0, 2])
def test_dispatch_replica_choice_equals_bincount_formula(rotation: int) -> None:
    placement = Placement.from_physical_to_logical([0, 1, 2, 0, 0, 1, 3, 2, 4, 5], num_experts=6)
    l2p, counts = _maps(placement)
    ids = torch.randint(0, 5, (57, 4), generator=torch.Generator().manual_seed(7))  # expert 5 unused
    assert torch.equal(choose_replica_slots(ids, l2p, counts, rotation=rotation),
                       _replica_slots_reference(ids, l2p, counts, rotation))


@pytest.mark.parametrize("seed", range(4))
def test_dispatch_regroup_permutation_is_the_stable_slot_sort(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    p, per_rank = 3, 4
    recv_ps = torch.randint(0, 4, (p, per_rank), generator=gen) * (torch.rand(p, per_rank, generator=gen) > 0.3)
    local_slot = torch.arange(per_rank).repeat(p).repeat_interleave(recv_ps.reshape(-1))
    regroup, ungroup = _regroup_permutation(recv_ps, int(recv_ps.sum()))
    assert torch.equal(regroup, torch.argsort(local_slot, stable=True))
    assert torch.equal(regroup[ungroup], torch.arange(regroup.numel()))


def test_dispatch_preprocess_state_and_counts() -> None:
    slots = torch.randint(0, 6, (11, 3), generator=torch.Generator().manual_seed(3))
    x = torch.randn(11, 2)
    x_nd, state = TokenDispatcher(num_slots=6).dispatch_preprocess(x, slots)
    order = torch.argsort(slots.reshape(-1), stable=True)
    assert torch.equal(state.order_N, order)
    assert torch.equal(state.token_index_N, order // 3)
    assert torch.equal(state.position_TK.reshape(-1)[order], torch.arange(33))
    assert torch.equal(x_nd, x[order // 3])
    assert state.send_counts == state.recv_counts == [33]
    assert state.tokens_per_local_slot == torch.bincount(slots.reshape(-1), minlength=6).tolist()
    assert state.regroup_R is None and state.ungroup_R is None


@pytest.mark.parametrize("bad", [-1, 6])
def test_dispatch_preprocess_rejects_slot_ids_out_of_range(bad: int) -> None:
    slots = torch.tensor([[0, 5], [bad, 1]])
    with pytest.raises(ValueError, match=r"slot ids must lie in \[0, num_slots=6\); 1 of 4 do not"):
        TokenDispatcher(num_slots=6).dispatch_preprocess(torch.randn(2, 3), slots)


def _round_trip(dispatcher: TokenDispatcher, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor):
    """Dispatch, 'expert' = multiply by (global slot + 1), combine."""
    x_nd, state = dispatcher.dispatch_preprocess(x, slots)
    x_md = dispatcher.dispatch_postprocess(dispatcher.token_dispatch(x_nd, state), state)
    per_rank = dispatcher.num_slots // dispatcher.ep_size
    rank = 0 if dispatcher.ep_group is None else torch.distributed.get_rank(dispatcher.ep_group)
    local = torch.repeat_interleave(torch.arange(per_rank), torch.tensor(state.tokens_per_local_slot))
    y_md = x_md * (local + rank * per_rank + 1).unsqueeze(-1).to(x.dtype)
    y_nd = dispatcher.token_combine(dispatcher.combine_preprocess(y_md, state), state)
    return dispatcher.combine_postprocess(y_nd, weights, state), state


def _expected(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(1) * (slots + 1).unsqueeze(-1).to(x.dtype) * weights.unsqueeze(-1)).sum(1)


def test_dispatch_single_rank_round_trip_and_group_sizes() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(0, 6, (7, 3))
    weights = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    out, state = _round_trip(TokenDispatcher(num_slots=6), x, slots, weights)
    torch.testing.assert_close(out, _expected(x, slots, weights), rtol=0, atol=1e-12)
    assert state.tokens_per_local_slot == torch.bincount(slots.reshape(-1), minlength=6).tolist()
    out.sum().backward()
    torch.testing.assert_close(weights.grad, (x.sum(-1, keepdim=True) * (slots + 1)).detach(), rtol=0, atol=1e-12)


def _dist_round_trip(rank: int, world: int) -> list[float]:
    torch.manual_seed(10 + rank)
    dispatcher = TokenDispatcher(num_slots=8, ep_group=torch.distributed.new_group(list(range(world))))
    errors = []
    for case in range(3):
        x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        if case == 0:  # everything stays on this rank: the peer's split is empty both ways
            slots = torch.randint(rank * 4, rank * 4 + 4, (6, 2))
        elif case == 1 and rank == 0:  # rank 0 routes nothing at all
            x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
            slots = torch.zeros(0, 2, dtype=torch.long)
        else:
            slots = torch.randint(0, 8, (x.shape[0], 2))
        weights = torch.rand(slots.shape, dtype=torch.float64, requires_grad=True)
        out, _ = _round_trip(dispatcher, x, slots, weights)
        errors.append(float((out - _expected(x, slots, weights)).abs().max()) if out.numel() else 0.0)
        out.pow(2).sum().backward()
        want = 2 * _expected(x, slots, weights).detach()
        scaled = x.detach().unsqueeze(1) * (slots + 1).unsqueeze(-1)  # [T, K, D] expert outputs per copy
        grad_ref = (want.unsqueeze(1) * (slots + 1).unsqueeze(-1) * weights.detach().unsqueeze(-1)).sum(1)
        errors.append(float((x.grad - grad_ref).abs().max()) if x.numel() else 0.0)
        gate_ref = (scaled * want.unsqueeze(1)).sum(-1)
        errors.append(float((weights.grad - gate_ref).abs().max()) if x.numel() else 0.0)
    return errors


@pytest.mark.dist
def test_dispatch_all_to_all_two_ranks_rows_and_grads_with_empty_splits() -> None:
    for errors in run_ranks(_dist_round_trip, world_size=2, timeout_s=60):
        assert max(errors) < 1e-12, errors
