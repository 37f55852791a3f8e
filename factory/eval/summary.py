"""The end-of-pipeline summary: teacher against primed hybrid, as a table (summary.md) and JSON."""

from __future__ import annotations

import json
from pathlib import Path


def summary_table(result: dict, recipe: str) -> str:
    h, init = result["heldout"], result.get("heldout_initialized_hybrid")
    gap = 100 * (h["student_loss"] / h["teacher_loss"] - 1)
    rows = [("held-out loss", f"{h['teacher_loss']:.4f}", f"{h['student_loss']:.4f} ({gap:+.1f}%)"),
            ("KL(teacher || hybrid) / token", "0", f"{h['kl']:.4f}")]
    if init:
        rows.insert(1, ("held-out loss, hybrid before training", "", f"{init['student_loss']:.4f}"))
    before_sft = result.get("heldout_before_sft")
    if before_sft:
        gap_before = 100 * (before_sft["student_loss"] / h["teacher_loss"] - 1)
        rows.insert(1, ("held-out loss, primed before sft", "", f"{before_sft['student_loss']:.4f} ({gap_before:+.1f}%)"))
        rows.insert(3 if init else 2, ("KL / token, primed before sft", "", f"{before_sft['kl']:.4f}"))
    for task, by_distance in result["retrieval"]["teacher"].items():
        for distance, acc in by_distance.items():
            hybrid = result["retrieval"]["student"][task][distance]
            rows.append((f"{task} retrieval @ {distance} tokens", f"{acc:.2f}", f"{hybrid:.2f}"))
    if result.get("chat"):
        chat = result["chat"]
        rows.append((f"chat: greedy answer = teacher's ({chat['prompts']} prompts)", "", f"{chat['matches_teacher']:.2f}"))
        rows.append(("chat: greedy answer = reference", "", f"{chat['matches_reference']:.2f}"))
    kv = result["kv_cache_bytes_per_token"]
    rows.append(("KV-cache bytes / token (bf16)", f"{kv['teacher']:,}", f"{kv['student']:,}"))
    rows.append(("parameters", f"{result['parameters']['teacher']:,}", f"{result['parameters']['student']:,}"))
    if result.get("export_format"):
        rows.append(("export format", "", result["export_format"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"# Primed hybrid vs teacher ({recipe}; GDN layers {result['gdn_layers']})", "",
             f"| {'metric'.ljust(width)} | teacher | hybrid |", f"|{'-' * (width + 2)}|---|---|"]
    lines += [f"| {name.ljust(width)} | {t} | {s} |" for name, t, s in rows]
    return "\n".join(lines) + "\n"


def write_summary(eval_dir: Path, pipeline_root: Path, recipe: str) -> str:
    result = json.loads((Path(eval_dir) / "eval.json").read_text())
    table = summary_table(result, recipe)
    (pipeline_root / "summary.md").write_text(table)
    (pipeline_root / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return table
