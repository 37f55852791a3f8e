"""``eval``: the teacher against the primed hybrid (recall by task and distance and on the user's recall
files, held-out loss and KL, chat, and the named lm-eval tasks on the export)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factory.data.chat import read_conversations
from factory.data.packing import packed_rows
from factory.eval.chat import chat_agreement
from factory.eval import harness
from factory.eval.heldout import heldout_metrics, kv_cache_bytes_per_token, parameter_count, recurrent_state_bytes
from factory.eval.recall import by_task, compare, compare_files, recall_by_distance, recall_files_accuracy
from factory.rundir import model_dir, read_stage
from factory.stages.base import DEEPSPEED, MODEL, RUN, Stage
from factory.stages.context import StageContext
from factory.stages.training import load_student


def _recall(ctx: StageContext, teacher, student) -> tuple[dict, dict]:
    """Greedy exact-match recall of both models: the raw ``{model: {task: {distance: acc}}}`` (the
    ``retrieval`` key that studies read) and the comparison by distance, by task and by recall file."""
    e, raw, files = ctx.cfg.eval, {}, {}
    for name, model in (("teacher", teacher), ("student", student)):
        who = "hybrid" if name == "student" else name
        _progress(ctx, f"recall, {who}: distances {e.retrieval_distances}, {e.retrieval_samples} samples each"
                       + (f"; {len(e.recall_files)} recall file(s)" if e.recall_files else ""))
        raw[name] = recall_by_distance(model, ctx.tokenizer, e.retrieval_distances, e.retrieval_samples,
                                       seed=ctx.cfg.seed, device=str(ctx.device))
        files[name] = recall_files_accuracy(model, ctx.tokenizer, e.recall_files, str(ctx.device))
    by_distance = compare(raw["teacher"], raw["student"])
    return raw, {"by_task": by_task(by_distance, ctx.cfg.data.seq_len), "by_distance": by_distance,
                 "files": compare_files(files["teacher"], files["student"]),
                 "warn": {"recall_ratio": e.recall_warn_ratio, "kl": e.kl_warn}}


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
    (the same inputs on each, so the same results) and rank 0 writes them; lm-eval runs on rank 0 alone."""
    rows = packed_rows(ctx.cfg.data.heldout_files, ctx.tokenizer, ctx.cfg.data.seq_len, ctx.cfg.data.text_field,
                       ctx.cache_dir)
    result = _compare(ctx, rows)
    if ctx.env.is_main:
        if ctx.cfg.eval.lm_eval_tasks:
            result["lm_eval"] = _lm_eval(ctx)
        (ctx.stage_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return {"tokens": 0, "student_loss": result["heldout"]["student_loss"], "partitioned_models": ctx.zero3}


def _compare(ctx: StageContext, rows) -> dict:
    # Its own function so that both models are released before lm-eval loads its own copies.
    with ctx.forward_only(ctx.load_teacher()) as teacher, ctx.forward_only(load_student(ctx).eval()) as student:
        return _evaluate(ctx, teacher, student, rows)


def _lm_eval(ctx: StageContext) -> dict:
    """The named lm-eval tasks on the teacher and on the export (the directory a user gets), each loaded
    whole by stock transformers, one model at a time."""
    e, export = ctx.cfg.eval, model_dir(ctx.parent_dir)  # validation put export right before eval
    dtype = torch.bfloat16 if ctx.precision == "bf16" else torch.float32
    limit = f", at most {e.lm_eval_limit} documents each" if e.lm_eval_limit else ""
    found = {}
    for who, path in (("teacher", ctx.cfg.model.path), ("hybrid", export)):
        _progress(ctx, f"lm-eval, {who}: {', '.join(e.lm_eval_tasks)}{limit}")
        harness.import_qwen3_5_for(str(ctx.device))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=ctx.cfg.model.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        found[who] = harness.run_tasks(model.to(ctx.device).eval(), tokenizer, e.lm_eval_tasks, e.lm_eval_limit,
                                       e.lm_eval_batch_size)
        del model
    return {"tasks": list(e.lm_eval_tasks), "limit": e.lm_eval_limit, "export": str(export),
            "by_task": harness.compare(found["teacher"], found["hybrid"])}


def _progress(ctx: StageContext, part: str) -> None:
    if ctx.env.is_main:
        print(f"[eval] {part}", flush=True)


def _evaluate(ctx: StageContext, teacher, student, rows) -> dict:
    e = ctx.cfg.eval
    _progress(ctx, f"held-out loss and KL, teacher vs hybrid ({min(e.heldout_rows, len(rows))} rows)")
    result = {"heldout": heldout_metrics(teacher, student, rows, e.heldout_rows, e.batch_size, ctx.device)}
    for key, stage_dir, what in (("heldout_initialized_hybrid", ancestor(ctx.parent_dir, "init"), "after init"),
                                 ("heldout_before_sft", _before_sft(ctx.parent_dir), "before sft")):
        if stage_dir is not None:
            _progress(ctx, f"held-out loss of the hybrid {what}")
        result[key] = _stage_model_metrics(ctx, teacher, rows, stage_dir)
    result["retrieval"], result["recall"] = _recall(ctx, teacher, student)
    if "sft" in ctx.cfg.stages:
        _progress(ctx, f"chat: greedy answers to {e.chat_prompts} held-out prompts")
    return {**result,
            "parameters": {"teacher": parameter_count(teacher), "student": parameter_count(student)},
            "kv_cache_bytes_per_token": {"teacher": kv_cache_bytes_per_token(teacher.config),
                                         "student": kv_cache_bytes_per_token(student.config)},
            "recurrent_state_bytes_per_sequence": recurrent_state_bytes(student.config),
            "gdn_layers": student.config.linear_layers,
            "chat": _chat(ctx, teacher, student) if "sft" in ctx.cfg.stages else None,
            "train_seq_len": ctx.cfg.data.seq_len,
            "export_format": ctx.cfg.export.format if "export" in ctx.cfg.stages else None}


# ``stages``: chat agreement is measured when the pipeline instruction-tunes. The slice holds
# eval.recall_files (by path, like the data files: edit a file in place and eval is reused), the
# warning bounds, which eval.json records for the summary, and the lm-eval tasks, limit and batch size
# (by name, like the recall files by path).
STAGE = Stage("eval", run_eval, slice="eval",
              shared=(*RUN, *MODEL, "data.heldout_files", "data.chat_heldout_files", "data.text_field",
                      "data.seq_len", "stages", "export.format", *DEEPSPEED), parent="init", ranks="zero3")
