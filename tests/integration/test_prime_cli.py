"""The main job from the command line on the embedded teacher: a shortened gdn_50pct run, its
artifacts, the quality bound, a fresh-process load of the export, the ``lm_eval`` command line on the
export (the eval stage runs the same local tasks in process), and a rerun that skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factory.eval.harness import TASKS_DIR
from tests.helpers import run_stock_python

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Far fewer steps than the demo, and a small eval: the bound checked here is looser than docs/QUALITY.md's.
# These steps measured (16 held-out rows, the recipe's gdn_proxy selection): primed +0.57% over the teacher's
# held-out loss, its gap 0.09 of the initialized hybrid's (the bounds: 5% and 0.5), after sft +0.63% (10%). Recall
# beyond the training length, left out of the mean by task, is checked in test_eval_recall.
SHORT = ["align.steps=20", "distill.steps=24", "longctx.steps=2", "longctx.seq_len=1024", "sft.steps=4",
         "eval.retrieval_samples=4", "eval.retrieval_distances=[64,256]", "eval.heldout_rows=16",
         "eval.chat_prompts=4", "eval.lm_eval_tasks=[hmf]", "eval.lm_eval_limit=8", "threads=2"]
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


def lm_eval_cli(model_dir: Path, tmp_path: Path) -> dict:
    """``lm_eval`` (the console script) on a model directory, in a fresh process that cannot import
    factory or fla (stand-ins that raise ImportError come first on the path; fla: see
    tests.helpers.STOCK_ONLY), offline; lm-eval's results JSON."""
    for name in ("factory", "fla", "causal_conv1d"):
        (tmp_path / "hidden" / name).mkdir(parents=True)
        (tmp_path / "hidden" / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden')\n")
    # One thread: the tiny model gains nothing from more, and a machine busy with other work loses much.
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hidden"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
               f"pretrained={model_dir},dtype=float32", "--tasks", "hmf", "--include_path", str(TASKS_DIR),
               "--device", "cpu", "--batch_size", "8", "--limit", "8", "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())


def test_lm_eval_command_line_on_the_export(run, tmp_path):
    """The local tasks on the Qwen3.5 export through lm-eval's own command line give the scores the eval
    stage found through its Python API on the same directory (the first 8 documents of each task, both);
    the teacher recalls (it retrieves inside its training length), and the summary puts teacher and
    hybrid side by side."""
    out, _ = run
    cli = lm_eval_cli(out / "07-export" / "model", tmp_path)
    stage = json.loads((out / "summary.json").read_text())["lm_eval"]
    assert stage["tasks"] == ["hmf"] and set(stage["by_task"]) == set(cli["results"])
    for task, row in stage["by_task"].items():
        assert row["samples"] == cli["n-samples"][task]["effective"] == 8
        for metric, scores in row["metrics"].items():
            assert cli["results"][task][metric] == pytest.approx(scores["hybrid"], abs=1e-9), (task, metric)
    teacher = {task: row["metrics"] for task, row in stage["by_task"].items()}
    # On all documents the teacher scores 0.92, 1.00, 1.00 and 0.92 (chance: 0, 0, 0.25, 0.25).
    assert teacher["hmf_kv_recall"]["exact_match,strip"]["teacher"] >= 0.75
    assert teacher["hmf_passkey"]["exact_match,strip"]["teacher"] >= 0.75
    assert teacher["hmf_kv_choice"]["acc,none"]["teacher"] >= 0.75
    assert teacher["hmf_continuation"]["acc,none"]["teacher"] >= 0.5
    assert "| lm-eval hmf_kv_recall: exact_match (strip), 8 items" in (out / "summary.md").read_text()


def test_rerun_skips_complete_stages(run):
    out, _ = run
    again = prime(f"output_dir={out}", *SHORT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(STAGES)
