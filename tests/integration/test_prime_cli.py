"""The main job from the command line on the embedded teacher: a shortened gdn_50pct run, its
artifacts, the quality bound, a fresh-process load of the export, and a rerun that skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import run_stock_python

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Fewer steps than the demo: the bound checked here is looser than docs/QUALITY.md's.
SHORT = ["align.steps=60", "distill.steps=80", "longctx.steps=4", "longctx.seq_len=1024", "sft.steps=10",
         "eval.retrieval_samples=8", "eval.retrieval_distances=[64,256,1024]", "eval.heldout_rows=32",
         "eval.chat_prompts=8", "threads=2"]
STAGES = ["select", "init", "align", "distill", "longctx", "sft", "export", "eval"]


def prime(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "factory.prime", "+recipe=gdn_50pct", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prime") / "run"
    result = prime(f"output_dir={out}", *SHORT)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_every_stage_completes_and_describes_itself(run):
    out, result = run
    for index, stage in enumerate(STAGES, 1):
        meta = json.loads((out / f"{index:02d}-{stage}" / "stage.json").read_text())
        assert meta["complete"] and meta["stage"] == stage
    assert (out / "01-select" / "selection.png").exists()
    assert (out / "03-align" / "loss.png").exists() and (out / "04-distill" / "metrics.jsonl").exists()
    card = (out / "07-export" / "model" / "README.md").read_text()
    assert "linear_attention" not in card and "GDN" in card and "distill" in card
    summary = (out / "summary.md").read_text()
    assert "| held-out loss" in summary
    assert summary.splitlines()[4].startswith("| kv recall (mean @ 64/256 tokens)")  # recall opens the table
    assert "Primed hybrid vs teacher" in result.stdout


def test_primed_hybrid_recovers_the_teacher(run):
    out, _ = run
    result = json.loads((out / "summary.json").read_text())
    teacher, final = result["heldout"]["teacher_loss"], result["heldout"]["student_loss"]
    primed = result["heldout_before_sft"]["student_loss"]
    initialized = result["heldout_initialized_hybrid"]["student_loss"]
    assert primed <= 1.05 * teacher, (primed, teacher)
    assert primed - teacher < 0.5 * (initialized - teacher), (primed, initialized, teacher)
    assert final <= 1.10 * teacher, (final, teacher)  # instruction tuning moves it off the text distribution
    assert result["kv_cache_bytes_per_token"]["student"] == result["kv_cache_bytes_per_token"]["teacher"] // 2


def test_export_loads_and_generates_in_stock_transformers_without_factory(run):
    """The default export is the Qwen3.5 text format: no trust_remote_code, no factory (fla blocked so
    transformers' pure-torch GDN path runs on CPU; see tests.helpers.STOCK_ONLY)."""
    out, _ = run
    model_dir = out / "07-export" / "model"
    script = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r})
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})
        ids = tok("The pass key is", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 6 or tok.eos_token_id in out[0].tolist()
        print(type(model).__name__, model.config.layer_types.count("linear_attention"))
    """)
    result = run_stock_python(script, cwd=model_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["Qwen3_5ForCausalLM", "4"]
    card = (model_dir / "README.md").read_text()
    assert "from_pretrained(path)" in card and "trust_remote_code" not in card
    assert "| export format" in (out / "summary.md").read_text() and "qwen3_5" in (out / "summary.md").read_text()


def test_rerun_skips_complete_stages(run):
    out, _ = run
    again = prime(f"output_dir={out}", *SHORT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(STAGES)
