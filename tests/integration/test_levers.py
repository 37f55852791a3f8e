"""Issue 15's recall levers from the command line on the embedded teacher, in short stages:
``data.synthetic_mix`` mixes synthetic recall rows into align's and distill's rows (recorded as their
identity and in their stage records), ``init.kv_heads=expanded`` gives GDN one trained K/V head per
query head, and the ``hqwen3`` export of that model loads back to the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factory.models.hqwen3 import HQwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ARGS = ["stages=[select,init,align,distill,export]", "select.method=alternate",
        "data.synthetic_mix=0.25", "init.kv_heads=expanded",
        "data.seq_len=256", "align.steps=3", "distill.steps=3", "align.batch_size=4", "distill.batch_size=4",
        "export.format=hqwen3", "threads=2"]


def test_synthetic_mix_and_expanded_kv_heads_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "factory.prime", "+recipe=gdn_50pct", f"output_dir={out}", *ARGS],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("03-align", "04-distill"):
        meta = json.loads((out / stage / "stage.json").read_text())
        assert meta["identity"]["shared"]["data.synthetic_mix"] == 0.25
        assert abs(meta["synthetic_rows"] / meta["rows"] - 0.25) < 0.01, meta
        assert f"{meta['synthetic_rows']:,} of {meta['rows']:,} rows are synthetic recall rows" in result.stdout
    init = json.loads((out / "02-init" / "model" / "config.json").read_text())
    assert init["linear_num_key_heads"] == init["linear_num_value_heads"] == init["num_attention_heads"] == 4
    assert init["num_key_value_heads"] == 2
    distilled = HQwen3ForCausalLM.from_pretrained(out / "04-distill" / "model").eval()
    gdn = distilled.model.layers[distilled.config.linear_layers[0]].linear_attn
    heads = gdn.k_proj.weight.view(4, gdn.shape.key_head_dim, -1)
    assert not torch.equal(heads[0], heads[1])  # copies of one teacher head at init, trained apart
    exported = HQwen3ForCausalLM.from_pretrained(out / "05-export" / "model").eval()
    ids = torch.randint(3, distilled.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, distilled(ids).logits)
