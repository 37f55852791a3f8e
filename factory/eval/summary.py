"""The end-of-pipeline summary: teacher against primed hybrid, as a table (summary.md) and JSON.

The table opens with recall (what attention is for, and what a hybrid loses first) and the lm-eval
scores of teacher and export when ``eval.lm_eval_tasks`` names tasks, then held-out loss and KL: a
held-out loss below the teacher's does not mean a better model (an overfit teacher loses to any
smoother student on held-out text), so loss is never reported alone. ``WARNING`` lines
follow the table when the hybrid keeps too little of the teacher's recall or drifts too far from it.
"""

from __future__ import annotations

import json
from pathlib import Path

from factory.config.schema import EvalConfig

DEFAULT_WARN = {"recall_ratio": EvalConfig.recall_warn_ratio, "kl": EvalConfig.kl_warn}


def _kept(row: dict) -> str:
    return "n/a" if row["kept"] is None else f"{100 * row['kept']:.0f}%"


def _recall_rows(recall: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for task, row in recall["by_task"].items():
        where = "/".join(map(str, row["distances"]))
        rows.append((f"{task} recall (mean @ {where} tokens)", f"{row['teacher']:.2f}", f"{row['hybrid']:.2f}",
                     _kept(row)))
    for name, row in recall.get("files", {}).items():
        rows.append((f"recall file {Path(name).name} ({row['items']} items)", f"{row['teacher']:.2f}",
                     f"{row['hybrid']:.2f}", _kept(row)))
    return rows


def _lm_eval_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """One row a task and metric (lm-eval keys a metric by ``<metric>,<filter>``; the filter is named
    when there is one)."""
    rows = []
    for task, row in (result.get("lm_eval") or {}).get("by_task", {}).items():
        for key, m in row["metrics"].items():
            metric, _, filtered = key.partition(",")
            name = metric + (f" ({filtered})" if filtered not in ("", "none") else "")
            items = f", {row['samples']} items" if row.get("samples") else ""
            rows.append((f"lm-eval {task}: {name}{items}", f"{m['teacher']:.2f}", f"{m['hybrid']:.2f}", _kept(m)))
    return rows


def _loss_rows(result: dict) -> list[tuple[str, str, str, str]]:
    h, init = result["heldout"], result.get("heldout_initialized_hybrid")
    gap = 100 * (h["student_loss"] / h["teacher_loss"] - 1)
    rows = [("held-out loss", f"{h['teacher_loss']:.4f}", f"{h['student_loss']:.4f} ({gap:+.1f}%)", ""),
            ("KL(teacher || hybrid) / token", "0", f"{h['kl']:.4f}", "")]
    if init:
        rows.insert(1, ("held-out loss, hybrid before training", "", f"{init['student_loss']:.4f}", ""))
    before_sft = result.get("heldout_before_sft")
    if before_sft:
        gap_before = 100 * (before_sft["student_loss"] / h["teacher_loss"] - 1)
        rows.insert(1, ("held-out loss, primed before sft", "",
                        f"{before_sft['student_loss']:.4f} ({gap_before:+.1f}%)", ""))
        rows.insert(3 if init else 2, ("KL / token, primed before sft", "", f"{before_sft['kl']:.4f}", ""))
    return rows


def _detail_rows(result: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for task, by_distance in result["recall"]["by_distance"].items():
        for distance, row in by_distance.items():
            rows.append((f"{task} recall @ {distance} tokens", f"{row['teacher']:.2f}", f"{row['hybrid']:.2f}",
                         _kept(row)))
    if result.get("chat"):
        chat = result["chat"]
        rows.append((f"chat: greedy answer = teacher's ({chat['prompts']} prompts)", "",
                     f"{chat['matches_teacher']:.2f}", ""))
        rows.append(("chat: greedy answer = reference", "", f"{chat['matches_reference']:.2f}", ""))
    kv = result["kv_cache_bytes_per_token"]
    rows.append(("KV-cache bytes / token (bf16)", f"{kv['teacher']:,}", f"{kv['student']:,}", ""))
    rows.append(("parameters", f"{result['parameters']['teacher']:,}", f"{result['parameters']['student']:,}", ""))
    if result.get("export_format"):
        rows.append(("export format", "", result["export_format"], ""))
    return rows


def warnings(result: dict) -> list[str]:
    """One line per task or recall file where the hybrid keeps less than the bound of the teacher's
    recall (none where the teacher scores 0: there is nothing to keep), and one if KL is above its bound."""
    warn = {**DEFAULT_WARN, **result["recall"].get("warn", {})}
    lines = []
    recall = result["recall"]
    for label, rows in (("task", recall["by_task"]), ("recall file", recall.get("files", {}))):
        for name, row in rows.items():
            if row["kept"] is not None and row["kept"] < warn["recall_ratio"]:
                lines.append(f"WARNING: the hybrid keeps {_kept(row)} of the teacher's recall on {label} {name} "
                             f"({row['hybrid']:.2f} vs {row['teacher']:.2f}), below eval.recall_warn_ratio="
                             f"{warn['recall_ratio']:g}")
    kl = result["heldout"]["kl"]
    if kl > warn["kl"]:
        lines.append(f"WARNING: KL(teacher || hybrid) {kl:.4f} / token is above eval.kl_warn={warn['kl']:g}")
    return lines


def summary_table(result: dict, recipe: str) -> str:
    rows = _recall_rows(result["recall"]) + _lm_eval_rows(result) + _loss_rows(result) + _detail_rows(result)
    width = max(len(r[0]) for r in rows)
    lines = [f"# Primed hybrid vs teacher ({recipe}; GDN layers {result['gdn_layers']})", "",
             f"| {'metric'.ljust(width)} | teacher | hybrid | hybrid / teacher |", f"|{'-' * (width + 2)}|---|---|---|"]
    lines += [f"| {name.ljust(width)} | {t} | {s} | {k} |" for name, t, s, k in rows]
    found = warnings(result)
    return "\n".join(lines + ([""] + found if found else [])) + "\n"


def write_summary(eval_dir: Path, pipeline_root: Path, recipe: str) -> str:
    result = json.loads((Path(eval_dir) / "eval.json").read_text())
    table = summary_table(result, recipe)
    (pipeline_root / "summary.md").write_text(table)
    (pipeline_root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return table
