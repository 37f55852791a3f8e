"""Settings that did nothing are gone: setting one is an unknown key at composition."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from factory.config import compose


@pytest.mark.parametrize("override", ["launcher.kind=slurm", "distill.loss=kl", "longctx.loss=ce", "sft.loss=ce",
                                      "align.trainable=all", "launcher=local"])
def test_removed_setting_is_unknown(override):
    with pytest.raises(ConfigCompositionException):
        compose(["+recipe=gdn_50pct", override])


def test_align_keeps_its_loss_choice():
    cfg, _ = compose(["+recipe=gdn_50pct", "align.loss=pre_lm_head"])
    assert cfg.align.loss == "pre_lm_head" and not hasattr(cfg.align, "trainable")
