"""The eval stage on a tiny run: recall by task and distance for teacher and hybrid with the share kept
(the mean by task over the distances inside the training length),
the user's recall file scored for both, and the summary opening with recall."""

from __future__ import annotations

import json

import pytest

from factory.config.validate import validate_inputs
from factory.pipeline import run_pipeline
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

pytestmark = pytest.mark.slow


def test_eval_reports_recall_by_task_distance_and_recall_file(tmp_path):
    assets = make_tiny_assets(tmp_path / "assets")
    recall_file = tmp_path / "mine.jsonl"
    recall_file.write_text(json.dumps({"prompt": "The passkey is 42. The passkey is", "answer": " 42"}) + "\n"
                           + json.dumps({"prompt": "Key ab is 7. Key ab is", "answer": " 7"}) + "\n")
    cfg = tiny_pipeline_config(assets, tmp_path / "run", stages=("select", "init", "eval"), steps=2,
                               **{"eval.retrieval_distances": [16, 48, 96], "eval.recall_files": [str(recall_file)]})
    validate_inputs(cfg)
    root = run_pipeline(cfg, "")
    result = json.loads((root / "03-eval" / "eval.json").read_text())
    recall = result["recall"]
    assert set(recall["by_distance"]) == set(recall["by_task"]) == {"kv", "passkey"}
    for task, by_distance in recall["by_distance"].items():
        assert list(by_distance) == ["16", "48", "96"]
        for distance, row in by_distance.items():
            assert row["teacher"] == result["retrieval"]["teacher"][task][distance]
            assert row["hybrid"] == result["retrieval"]["student"][task][distance]
            assert row["kept"] == (row["hybrid"] / row["teacher"] if row["teacher"] else None)
        assert recall["by_task"][task]["distances"] == [16, 48]  # inside data.seq_len=64, 96 beyond it
    mine = recall["files"][str(recall_file)]
    assert mine["items"] == 2 and 0 <= mine["teacher"] <= 1 and 0 <= mine["hybrid"] <= 1
    assert recall["warn"] == {"recall_ratio": 0.9, "kl": 0.3}
    summary = (root / "summary.md").read_text().splitlines()
    assert summary[4].startswith("| kv recall (mean @ 16/48 tokens)")
    assert summary[6].startswith("| recall file mine.jsonl (2 items)") and summary[7].startswith("| held-out loss")
