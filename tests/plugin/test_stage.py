"""Re-cutting a PipelineModule's layer list for each schedule, and building one rank's stages."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest
import torch
from deepspeed.pipe import LayerSpec
from deepspeed.runtime import utils as ds_utils
from dualmoe.errors import ConfigError
from dualmoe.schedule import generate
from dualmoe.stage import count_layer_params, partition_layers, plan_layout
from torch import nn

from tests.harness import run_ranks
from tests.plugin.pipeline_models import BASE_SEED, Block, Embed, loss_fn, mlp_specs, tied_specs


class Wide(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)


def test_stage_counts_parameters_without_building_for_real() -> None:
    specs = [LayerSpec(Wide, 10), nn.Linear(2, 3), torch.tanh, LayerSpec(Wide, 1)]
    assert count_layer_params(specs) == [110, 9, 0, 2]


def test_stage_partition_equals_deepspeed_partitioners() -> None:
    specs = [LayerSpec(Wide, w) for w in (8, 1, 1, 8, 1, 1, 1, 8)]
    weights = count_layer_params(specs)
    assert partition_layers(specs, 4, "parameters") == tuple(ds_utils.partition_balanced(weights, 4))
    assert partition_layers(specs, 4, "uniform") == tuple(ds_utils.partition_uniform(8, 4)) == (0, 2, 4, 6, 8)
    # 'type:' balances the matching layers only.
    mixed = [LayerSpec(Block), LayerSpec(Wide, 4), LayerSpec(Block), LayerSpec(Wide, 4), LayerSpec(Block),
             LayerSpec(Block)]
    bounds = partition_layers(mixed, 2, "type:block")
    assert [sum(isinstance(s, LayerSpec) and s.typename is Block for s in mixed[a:b])
            for a, b in itertools.pairwise(bounds)] == [2, 2]


@pytest.mark.parametrize(("specs", "parts", "method", "pattern"), [
    ([LayerSpec(Block)] * 3, 4, "uniform", r"3 layers, fewer than the 4 stages"),
    ([LayerSpec(Block)] * 4, 2, "type:attention", r"'type:attention' matches no layer; layer types are \['Block'\]"),
    ([LayerSpec(Block)] * 4, 2, "profile", r"'profile' is not 'parameters'"),
])
def test_stage_partition_rejects_bad_requests(specs: list, parts: int, method: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        partition_layers(specs, parts, method)


def test_stage_layout_v_places_both_ends_on_rank_zero() -> None:
    layout = plan_layout(tied_specs(6), generate("dualpipev", 2, 4), "uniform")
    assert layout.num_parts == 4 and layout.bounds == (0, 2, 4, 6, 8)
    assert layout.parts_of(0) == (0, 3) and layout.parts_of(1) == (1, 2)
    assert layout.tied == (("embed", (0, 7)),) and layout.tied_owners("embed") == (0,)
    assert layout.shared_rank_sets() == ()


def test_stage_layout_dualpipe_mirrors_parts_across_rank_pairs() -> None:
    layout = plan_layout(mlp_specs(8), generate("dualpipe", 4, 8), "uniform")
    assert layout.num_parts == 4
    assert [layout.parts_of(r) for r in range(4)] == [(0, 3), (1, 2), (1, 2), (0, 3)]
    assert [layout.part_owners(k) for k in range(4)] == [(0, 3), (1, 2), (1, 2), (0, 3)]
    assert layout.shared_rank_sets() == ((0, 3), (1, 2))


def test_stage_layout_1f1b_ties_first_and_last_rank() -> None:
    layout = plan_layout(tied_specs(4), generate("1f1b", 3, 3), "uniform")
    assert layout.parts_of(1) == (1,)
    assert layout.tied_owners("embed") == (0, 2) and layout.shared_rank_sets() == ((0, 2),)


def _build(rank: int, world_size: int, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    return [_build_one(rank, kind) for kind in kinds]


def _build_one(rank: int, kind: str) -> dict[str, Any]:
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from dualmoe.groups import build_groups
    from dualmoe.stage import PipelineStages

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(rank)  # without seed_layers, ranks would build different weights
    source = PipelineModule(tied_specs(4), num_stages=2, loss_fn=loss_fn, partition_method="uniform")
    layout = plan_layout(source._layer_specs, generate(kind, 2, 4), "uniform")
    groups = build_groups(source.mpu(), shared_pp_ranks=layout.shared_rank_sets())
    stages = PipelineStages(source, layout=layout, pp_rank=groups.pp_rank,
                            shared_groups=[(r, g, groups.to_global(r[0])) for r, g in groups.shared])
    # Every use of the tied embedding (the Embed layer and the head's partial) on this rank, by object id.
    embeds = {id(f.args[0] if isinstance(f, functools.partial) else f) for stage in stages.stages.values()
              for f in stage._funcs if isinstance(f, (Embed, functools.partial))}
    return {"names": sorted(n for n, _ in stages.named_parameters()),
            "weights": {n: p.detach().clone().numpy() for n, p in stages.named_parameters()},
            "replicated": sorted(n for n, p in stages.named_parameters() if p.ds_pipe_replicated),
            "stages": {s: stage.layer_indices for s, stage in stages.stages.items()},
            "embeds": len(embeds),
            "source_left": len(list(source.parameters())), "loss_fn": stages.loss_fn is loss_fn}


@pytest.mark.dist
def test_stage_build_places_copies_ties_and_names_like_pipeline_module() -> None:
    (v0, d0), (v1, d1) = run_ranks(_build, 2, args=(("dualpipev", "dualpipe"),), timeout_s=120)
    # DeepSpeed's uniform cut of 6 layers into 4 parts: (0, 2, 4, 5, 6).
    assert v0["stages"] == {0: (0, 1), 3: (5,)} and v1["stages"] == {1: (2, 3), 2: (4,)}
    # Names as in PipelineModule: layer index first; the tied embedding and head share one module on rank 0.
    assert v0["names"] == ["1.block.fc1.bias", "1.block.fc1.weight", "1.block.fc2.bias", "1.block.fc2.weight",
                           "1.pos", "tied_modules.embed.weight"]
    assert v0["embeds"] == 1 and v1["embeds"] == 0
    assert v0["replicated"] == v1["replicated"] == [] and v0["source_left"] == 0 and v0["loss_fn"]
    # Rank 0 holds part 0 (copy 0) and part 1 (copy 1); rank 1 the mirror: same layers, same weights.
    assert d0["stages"] == {0: (0, 1, 2), 3: (3, 4, 5)} and d1["stages"] == {1: (3, 4, 5), 2: (0, 1, 2)}
    assert d0["names"] == d1["names"]
    for name, value in d0["weights"].items():
        assert (value == d1["weights"][name]).all(), name
    # Each rank of the pair owns the part of its copy-0 stage (rank 0: part 0 with the embedding, rank 1: part 1);
    # the other part is a replica, counted once in grad norms.
    assert {n.split(".")[0] for n in d0["replicated"]} == {"3", "4"}
    assert {n.split(".")[0] for n in d1["replicated"]} == {"1", "2", "tied_modules"}


def test_stage_seed_layers_give_layer_weights_independent_of_the_cut() -> None:
    ds_utils.set_random_seed(BASE_SEED + 3)
    first = LayerSpec(Block).build()
    ds_utils.set_random_seed(BASE_SEED + 3)
    again = LayerSpec(Block).build()
    assert torch.equal(first.fc1.weight, again.fc1.weight)
