"""The "moe" section of a DeepSpeed JSON: defaults, the example configs, and every bad combination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dualmoe.errors import ConfigError
from dualmoe.moe.config import MoEConfig, parse_moe_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _parse(**section) -> MoEConfig:
    cfg = parse_moe_config({"train_batch_size": 8, "moe": section})
    assert cfg is not None
    return cfg


def test_config_defaults_and_slots() -> None:
    cfg = _parse(num_experts=64, top_k=8, ep_size=4, num_redundant_experts=4)
    assert cfg.num_slots == 68
    assert cfg.router.score_func == "sigmoid" and cfg.router.bias_update_rate == 1e-3
    assert cfg.eplb.enabled is False and cfg.eplb.policy == "auto"
    assert parse_moe_config({"train_batch_size": 8}) is None


def test_config_is_frozen() -> None:
    cfg = _parse(num_experts=8, top_k=2)
    with pytest.raises(Exception, match="frozen"):
        cfg.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("moe_*.json")), ids=lambda p: p.name)
def test_config_example_files_parse(path: Path) -> None:
    cfg = parse_moe_config(json.loads(path.read_text()))
    assert cfg is not None and cfg.num_slots % cfg.ep_size == 0


BAD = [
    ({"num_experts": 64, "top_k": 8, "router": {"n_group": 3}},
     r"moe\.router\.n_group=3: num_experts \(64\) must be divisible by n_group; use an n_group among 1, 2, 4, 8"),
    ({"num_experts": 64, "top_k": 8, "router": {"n_group": 8, "topk_group": 9}},
     r"moe\.router\.topk_group=9: must be between 1 and n_group \(8\)"),
    ({"num_experts": 64, "top_k": 20, "router": {"n_group": 8, "topk_group": 2}},
     r"moe\.top_k=20: .*kept groups \(topk_group 2 x 8 experts per group = 16\)"),
    ({"num_experts": 64, "top_k": 0}, r"moe\.top_k=0: must be between 1"),
    ({"num_experts": 64, "top_k": 8, "ep_size": 3},
     r"moe\.ep_size=3: num_experts \(64\) must be divisible by ep_size"),
    ({"num_experts": 64, "top_k": 8, "ep_size": 4, "num_redundant_experts": 3},
     r"moe\.num_redundant_experts=3: slots S = .* = 67 must be divisible by ep_size \(4\); add 1"),
    ({"num_experts": 64, "top_k": 8, "num_redundant_experts": -1}, r"moe\.num_redundant_experts=-1: must be >= 0"),
    ({"num_experts": 64, "top_k": 8, "router": {"bias_update_rate": -0.1}},
     r"moe\.router\.bias_update_rate=-0\.1: must be >= 0"),
    ({"num_experts": 64, "top_k": 8, "router": {"routed_scaling_factor": 0}},
     r"moe\.router\.routed_scaling_factor=0\.0: must be > 0"),
    ({"num_experts": 64, "top_k": 8, "router": {"score_func": "relu"}},
     r"moe\.router\.score_func='relu': Input should be 'sigmoid' or 'softmax'"),
    ({"num_experts": 64, "top_k": 8, "routr": {}}, r"moe\.routr=\{\}: unknown key; valid keys: ep_size, eplb"),
    ({"num_experts": 64, "top_k": 8, "router": {"groups": 2}},
     r"moe\.router\.groups=2: unknown key; valid keys: aux_loss_alpha, bias_update_rate, n_group"),
    ({"num_experts": 64}, r"moe\.top_k: required key is missing"),
    ({"num_experts": 64, "top_k": 8, "eplb": {"ema": 1.5}}, r"moe\.eplb\.ema=1\.5: the decay must lie in \(0, 1\)"),
    ({"num_experts": 64, "top_k": 8, "eplb": {"remote_cost": -0.1}}, r"moe\.eplb\.remote_cost=-0\.1: must be >= 0"),
    ({"num_experts": 64, "top_k": 8, "eplb": {"remote_cost": "cheap"}}, r"moe\.eplb\.remote_cost='cheap'"),
    ({"num_experts": 64, "top_k": 8, "eplb": {"remote_slot_rows": 0}},
     r"moe\.eplb\.remote_slot_rows=0\.0: must be > 0"),
    ({"num_experts": 64, "top_k": 8, "eplb": {"interval": 0}}, r"moe\.eplb\.interval=0: must be >= 1"),
    ({"num_experts": 64, "top_k": 8, "ep_size": 4, "eplb": {"enabled": True, "num_nodes": 3}},
     r"moe\.eplb\.num_nodes=3: ep_size \(4\) must be divisible by num_nodes"),
    ({"num_experts": 64, "top_k": 8, "ep_size": 4, "router": {"n_group": 2, "topk_group": 1},
      "eplb": {"enabled": True, "num_nodes": 4, "policy": "hierarchical"}},
     r"moe\.eplb\.policy='hierarchical': router\.n_group \(2\) must be divisible by eplb\.num_nodes \(4\)"),
]


@pytest.mark.parametrize(("section", "message"), BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD])
def test_config_rejects_bad_section_with_key_value_rule_fix(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_moe_config({"moe": section})


def test_config_rejects_non_object_section() -> None:
    with pytest.raises(ConfigError, match=r"moe=\[1\] must be a JSON object"):
        parse_moe_config({"moe": [1]})
