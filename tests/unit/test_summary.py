"""The summary table: recall first (per task and recall file, teacher | hybrid | share kept), then loss
and KL; WARNING lines when the hybrid keeps too little recall or KL is above its bound."""

from __future__ import annotations

from factory.eval.recall import by_task, compare, compare_files
from factory.eval.summary import summary_table, warnings


def fake_result(hybrid_kv: float = 0.5, kl: float = 0.1, warn: dict | None = None) -> dict:
    teacher = {"kv": {64: 1.0, 256: 0.5, 1024: 0.0}, "passkey": {64: 1.0, 256: 1.0, 1024: 0.25}}
    student = {"kv": {64: hybrid_kv, 256: hybrid_kv / 2, 1024: 0.5}, "passkey": {64: 1.0, 256: 1.0, 1024: 0.0}}
    by_distance = compare(teacher, student)
    files = compare_files({"mine.jsonl": {"accuracy": 0.8, "items": 5}}, {"mine.jsonl": {"accuracy": 0.8, "items": 5}})
    return {"heldout": {"teacher_loss": 4.0, "student_loss": 3.9, "kl": kl},
            "retrieval": {"teacher": teacher, "student": student},
            "recall": {"by_task": by_task(by_distance, 512), "by_distance": by_distance, "files": files,
                       "warn": warn or {"recall_ratio": 0.9, "kl": 0.3}},
            "parameters": {"teacher": 10, "student": 9}, "kv_cache_bytes_per_token": {"teacher": 4, "student": 2},
            "gdn_layers": [1, 3], "chat": None, "export_format": None}


def test_table_opens_with_recall_per_task_then_loss():
    table = summary_table(fake_result(hybrid_kv=1.0), "r")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[2:5] == [" teacher ", " hybrid ", " hybrid / teacher "]
    # Per task, over the distances inside the training length (1024 > 512 left out of the mean).
    assert rows[1].startswith("| kv recall (mean @ 64/256 tokens)") and rows[1].endswith("| 0.75 | 0.75 | 100% |")
    assert rows[2].startswith("| passkey recall (mean @ 64/256 tokens)") and rows[2].endswith("| 100% |")
    assert rows[3].startswith("| recall file mine.jsonl (5 items)") and rows[3].endswith("| 0.80 | 0.80 | 100% |")
    assert rows[4].startswith("| held-out loss") and rows[5].startswith("| KL(teacher || hybrid)")
    assert "| kv recall @ 1024 tokens" in table and "| 0.00 | 0.50 | n/a |" in table  # teacher 0: no share
    assert "WARNING" not in table


def test_warning_when_the_hybrid_keeps_less_than_the_bound_on_a_task():
    result = fake_result(hybrid_kv=0.6)  # kv: 0.45 of the teacher's 0.75 = 60%
    lines = warnings(result)
    assert len(lines) == 1 and lines[0].startswith("WARNING: the hybrid keeps 60% of the teacher's recall on task kv")
    assert "eval.recall_warn_ratio=0.9" in lines[0]
    assert summary_table(result, "r").rstrip().endswith(lines[0])
    assert warnings(fake_result(hybrid_kv=0.6, warn={"recall_ratio": 0.5, "kl": 0.3})) == []  # the bound is a setting


def test_warning_when_kl_is_above_its_bound():
    lines = warnings(fake_result(hybrid_kv=1.0, kl=0.45))
    assert lines == ["WARNING: KL(teacher || hybrid) 0.4500 / token is above eval.kl_warn=0.3"]
    assert warnings(fake_result(hybrid_kv=1.0, kl=0.45, warn={"recall_ratio": 0.9, "kl": 0.5})) == []


def test_lm_eval_rows_follow_recall_with_teacher_hybrid_and_share_kept():
    from factory.eval.harness import compare as compare_tasks

    def scores(em: float, acc: float) -> dict:
        return {"hmf_kv_recall": {"samples": 24, "metrics": {"exact_match,strip": em}},
                "hmf_kv_choice": {"samples": 24, "metrics": {"acc,none": acc}}}

    result = fake_result(hybrid_kv=1.0)
    result["lm_eval"] = {"tasks": ["hmf"], "limit": None, "by_task": compare_tasks(scores(1.0, 0.5), scores(0.75, 0.0))}
    rows = [line for line in summary_table(result, "r").splitlines() if line.startswith("| ")]
    assert rows[4].startswith("| lm-eval hmf_kv_recall: exact_match (strip), 24 items")
    assert rows[4].endswith("| 1.00 | 0.75 | 75% |")
    assert rows[5].startswith("| lm-eval hmf_kv_choice: acc, 24 items") and rows[5].endswith("| 0.50 | 0.00 | 0% |")
    assert rows[6].startswith("| held-out loss")
