"""The local lm-eval tasks (factory/eval/lm_eval_tasks) without a model: the shipped data is what
assets/build_lm_eval_tasks.py writes, every task loads offline through lm-eval's own task index with
its documents, an unknown name is one error line, and the scores helpers. On CPU, transformers' Qwen3.5
is imported with fla hidden (its kernels cannot run on CPU tensors). The model runs, on the teacher and
on the export, through the ``lm_eval`` command line and the eval stage: tests/integration/test_prime_cli.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factory.config.errors import ConfigError
from factory.eval import harness
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = {"hmf_kv_recall": 24, "hmf_passkey": 16, "hmf_kv_choice": 24, "hmf_continuation": 24}


def test_shipped_data_is_what_the_builder_writes(tmp_path):
    builder = load_script(ROOT / "assets" / "build_lm_eval_tasks.py")
    written = builder.build(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in (harness.TASKS_DIR / "data").glob("*.jsonl"))
    for path in written:
        assert path.read_bytes() == (harness.TASKS_DIR / "data" / path.name).read_bytes(), path.name


def test_local_tasks_load_offline_with_their_documents():
    manager = harness.task_manager(["hmf"])
    with harness.offline():
        tasks = manager.load(["hmf"])["tasks"]  # the tag names all four
    docs = {name: list(task.test_docs()) for name, task in tasks.items()}
    assert {name: len(rows) for name, rows in docs.items()} == DOCUMENTS
    for row in docs["hmf_kv_recall"]:
        assert row["prompt"].endswith(" has value") and row["target"].isdigit() and row["distance"] <= 448
    assert all(row["prompt"].endswith("The pass key is") for row in docs["hmf_passkey"])
    for name in ("hmf_kv_choice", "hmf_continuation"):
        assert all(len(row["choices"]) == 4 and 0 <= row["label"] < 4 for row in docs[name])
    # The asked value is one of the four in the prompt: the distractors are the other facts.
    assert all(f"has value {row['choices'][row['label']]}." in row["prompt"] for row in docs["hmf_kv_choice"])
    harness.check_tasks(["hmf_kv_recall", "hmf"])


def test_unknown_task_name_is_one_line():
    with pytest.raises(ConfigError) as err:
        harness.check_tasks(["hmf_kv_recal"])
    message = str(err.value)
    assert "\n" not in message and "unknown lm-eval task(s) hmf_kv_recal" in message
    assert "hmf_kv_recall" in message and str(harness.TASKS_DIR) in message


def test_offline_sets_the_switches_the_hub_and_datasets_read_and_restores_them(monkeypatch):
    import datasets.config
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    before = (hub.is_offline_mode(), datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    with harness.offline():
        assert hub.is_offline_mode() and datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (hub.is_offline_mode(), datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")) == before
    assert "HF_DATASETS_OFFLINE" not in os.environ


def test_scores_keep_metrics_not_standard_errors_and_compare_gives_the_share_kept():
    def results(acc: float, em: float) -> dict:
        return {"results": {"a": {"alias": "a", "acc,none": acc, "acc_stderr,none": "N/A"},
                            "b": {"alias": "b", "exact_match,strip": em, "exact_match_stderr,strip": 0.1}},
                "n-samples": {"a": {"original": 4, "effective": 4}, "b": {"original": 8, "effective": 2}}}

    teacher, hybrid = harness.scores(results(0.5, 0.0)), harness.scores(results(0.25, 0.5))
    assert teacher == {"a": {"samples": 4, "metrics": {"acc,none": 0.5}},
                       "b": {"samples": 2, "metrics": {"exact_match,strip": 0.0}}}
    assert harness.compare(teacher, hybrid) == {
        "a": {"samples": 4, "metrics": {"acc,none": {"teacher": 0.5, "hybrid": 0.25, "kept": 0.5}}},
        "b": {"samples": 2, "metrics": {"exact_match,strip": {"teacher": 0.0, "hybrid": 0.5, "kept": None}}}}


# A stand-in fla whose kernels raise: imported plainly, transformers' Qwen3.5 binds them (the forward
# fails); imported through import_qwen3_5_for("cpu"), it binds its pure-torch path and fla is back after.
FLA_ON_CPU = """
import importlib, sys, types, torch
fla = types.ModuleType("fla")
def kernel(*args, **kwargs):
    raise RuntimeError("fla kernel on a CPU tensor")
fla.chunk_gated_delta_rule = fla.fused_recurrent_gated_delta_rule = kernel
sys.modules["fla"] = fla
from factory.eval.harness import QWEN3_5_MODELING, import_qwen3_5_for

def forward():
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM  # not transformers' cache
    config = Qwen3_5TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                               layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval()(torch.arange(12).view(1, 12)).logits

import_qwen3_5_for("cpu")
assert sys.modules["fla"] is fla
print("guarded", forward().isfinite().all().item())
for name in [n for n in sys.modules if n.startswith(QWEN3_5_MODELING.rpartition(".")[0])]:
    del sys.modules[name]
try:
    forward()
    print("plain ran")
except RuntimeError as err:
    print("plain", err)
"""


def test_cpu_import_binds_the_pure_torch_gdn_where_fla_imports():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(FLA_ON_CPU)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["guarded True", "plain fla kernel on a CPU tensor"], proc.stdout
