"""The ``eval`` stage and the end-of-pipeline summary (teacher vs primed hybrid)."""

from __future__ import annotations

import json
from pathlib import Path

from factory.data.chat import read_conversations
from factory.data.packing import packed_rows
from factory.eval.chat import chat_agreement
from factory.rundir import model_dir, read_stage
from factory.eval.heldout import heldout_metrics, kv_cache_bytes_per_token, parameter_count, recurrent_state_bytes
from factory.eval.retrieval import retrieval_accuracy
from factory.stage_context import StageContext


def _retrieval(model, ctx: StageContext) -> dict:
    e = ctx.cfg.eval
    return retrieval_accuracy(model, ctx.tokenizer, e.retrieval_distances, e.retrieval_samples,
                              seed=ctx.cfg.seed, device=str(ctx.device))


def ancestor(stage_dir: Path, stage: str) -> Path | None:
    """The directory of an earlier stage, found through the ``parent`` links of stage.json."""
    current = stage_dir
    while current is not None and (Path(current) / "stage.json").exists():
        meta = read_stage(current)
        if meta["stage"] == stage:
            return Path(current)
        current = meta.get("parent")
    return None


def _stage_model_metrics(ctx: StageContext, teacher, rows, stage_dir: Path | None) -> dict | None:
    """Held-out metrics of an earlier stage's model (e.g. right after init: the floor training lifts)."""
    if stage_dir is None:
        return None
    with ctx.forward_only(ctx.load_hybrid(model_dir(stage_dir)).eval()) as hybrid:
        if hybrid.config.keep_teacher_attention:
            hybrid.model.set_mixer_mode("student")  # GDN in converted layers, the kept attention unused
        e = ctx.cfg.eval
        return heldout_metrics(teacher, hybrid, rows, e.heldout_rows, e.batch_size, ctx.device)


def _chat(ctx: StageContext, teacher, student) -> dict:
    e = ctx.cfg.eval
    conversations = read_conversations(ctx.cfg.data.chat_heldout_files)
    return chat_agreement(teacher, student, ctx.tokenizer, conversations, e.chat_prompts, e.chat_max_new_tokens,
                          ctx.device, synced=ctx.zero3 and ctx.env.world_size > 1)


def _before_sft(stage_dir: Path) -> Path | None:
    """The model instruction tuning started from: primed, not yet tuned towards chat."""
    sft = ancestor(stage_dir, "sft")
    return Path(read_stage(sft)["parent"]) if sft is not None else None


def run_eval(ctx: StageContext) -> dict:
    """Teacher against the primed hybrid. Under ZeRO-3 every rank takes part with partitioned models
    (the same inputs on each, so the same results) and rank 0 writes them."""
    from factory.train.stages import load_student

    rows = packed_rows(ctx.cfg.data.heldout_files, ctx.tokenizer, ctx.cfg.data.seq_len, ctx.cfg.data.text_field,
                       ctx.cache_dir)
    with ctx.forward_only(ctx.load_teacher()) as teacher, ctx.forward_only(load_student(ctx).eval()) as student:
        result = _evaluate(ctx, teacher, student, rows)
    if ctx.env.is_main:
        (ctx.stage_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"tokens": 0, "student_loss": result["heldout"]["student_loss"], "partitioned_models": ctx.zero3}


def _evaluate(ctx: StageContext, teacher, student, rows) -> dict:
    e = ctx.cfg.eval
    return {
        "heldout": heldout_metrics(teacher, student, rows, e.heldout_rows, e.batch_size, ctx.device),
        "heldout_initialized_hybrid": _stage_model_metrics(ctx, teacher, rows, ancestor(ctx.parent_dir, "init")),
        "heldout_before_sft": _stage_model_metrics(ctx, teacher, rows, _before_sft(ctx.parent_dir)),
        "retrieval": {"teacher": _retrieval(teacher, ctx), "student": _retrieval(student, ctx)},
        "parameters": {"teacher": parameter_count(teacher), "student": parameter_count(student)},
        "kv_cache_bytes_per_token": {"teacher": kv_cache_bytes_per_token(teacher.config),
                                     "student": kv_cache_bytes_per_token(student.config)},
        "recurrent_state_bytes_per_sequence": recurrent_state_bytes(student.config),
        "gdn_layers": student.config.linear_layers,
        "chat": _chat(ctx, teacher, student) if "sft" in ctx.cfg.stages else None,
        "train_seq_len": ctx.cfg.data.seq_len,
        "export_format": ctx.cfg.export.format if "export" in ctx.cfg.stages else None,
    }


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
