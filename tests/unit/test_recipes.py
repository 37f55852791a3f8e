"""The ratio recipes share recipes/_base.yaml and state only what differs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from factory.config import RECIPE_DIR, ConfigError, available_recipes, compose, recipe_values


def test_base_is_not_a_recipe():
    assert available_recipes() == ["gdn_25pct", "gdn_50pct", "gdn_75pct"]
    with pytest.raises(ConfigError, match="unknown recipe '_base'"):
        compose(["+recipe=_base"])


@pytest.mark.parametrize("name,ratio", [("gdn_25pct", 0.25), ("gdn_50pct", 0.5), ("gdn_75pct", 0.75)])
def test_ratio_recipes_state_only_name_and_ratio(name, ratio):
    own = OmegaConf.to_container(OmegaConf.load(RECIPE_DIR / f"{name}.yaml"))
    assert own == {"defaults": ["_base"], "recipe": name, "select": {"ratio": ratio}}
    cfg, _ = compose([f"+recipe={name}"])
    assert cfg.recipe == name and cfg.select.ratio == ratio
    assert cfg.align.steps == OmegaConf.load(RECIPE_DIR / "_base.yaml").align.steps
    # Without Hydra (the study's tools): the same values.
    assert recipe_values(name).select.ratio == ratio and recipe_values(name).init.gate_init == cfg.init.gate_init
