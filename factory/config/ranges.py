"""The accepted set or range of every constrained config field, in one table.

``RULES`` maps a dotted field path to a ``Rule``; ``check_fields`` refuses the first value
outside its rule in one line naming the field, the value and what is accepted. A new field
with an accepted set or range gets a row here (a unit test walks the schema and fails on a
number or word field that is neither here nor in ``UNCONSTRAINED``), and the bad-value sweep
test takes each row's ``bad`` value from the table.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional

from factory.config.errors import ConfigError
from factory.config.schema import TRAIN_STAGES, PrimeConfig

SELECT_METHODS = ("manual", "alternate", "swa_proxy", "gdn_proxy", "kl_trained", "kl_restore")
SUPPORTED_FAMILIES = ("qwen3",)
ON_EXISTING = ("resume", "overwrite")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TRAINABLE = ("gdn", "gdn+norms", "gdn+norms+attention", "all")
SCHEDULES = ("cosine", "constant")
GATE_INITS = ("published", "random")
QK_NORMS = ("drop", "scale")
CONV_INITS = ("default", "identity")
KV_HEADS = ("shared", "expanded")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("qwen3_5", "hqwen3")
LOGGER_KINDS = ("none", "wandb")
LOGGER_MODES = ("offline", "online")
CHAT_OVERFLOW = ("truncate", "drop")
SCORE_METRICS = ("kl", "loss")
ALIGN_LOSSES = ("layerwise", "pre_lm_head")
DISTILL_TEACHERS = ("auto", "shared", "separate")
TEACHER_STREAMS = ("per_layer", "whole")


@dataclass(frozen=True)
class Rule:
    accepted: str  # what the error line says is accepted
    ok: Callable[[Any], bool]
    bad: Any  # a value outside the rule, for the sweep test
    choice: bool = False
    stage: Optional[str] = None  # checked with the inputs, and only when this stage runs


def choice(*values, stage: Optional[str] = None) -> Rule:
    return Rule(", ".join(map(str, values)), lambda v: v in values, "bogus", choice=True, stage=stage)


def minimum(low: int, *, integer: bool = True, optional: bool = False, what: str = "") -> Rule:
    text = what or (f"an integer >= {low}" if integer else f"a number >= {low}")
    return Rule(text + (", or null" if optional else ""),
                lambda v: (optional and v is None) or (v is not None and v >= low), low - 1)


def positive() -> Rule:
    return Rule("a number > 0", lambda v: v > 0, 0)


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False, what: str = "") -> Rule:
    brackets = ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high else "]")

    def ok(v) -> bool:
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return Rule(f"a number in {brackets}" + (f", {what}" if what else ""), ok, high + 1)


def names() -> Rule:
    """Names as lm-eval's command line takes them: no blanks, no commas (its list separator)."""
    return Rule("a list of names without spaces or commas, e.g. [hmf_kv_recall,hmf_passkey]",
                lambda v: all(x and "," not in x and not any(c.isspace() for c in x) for x in v), [""])


def int_list(low: int) -> Rule:
    return Rule(f"a non-empty list of integers >= {low}", lambda v: bool(v) and all(x >= low for x in v), [low - 1])


OPTIM = {"lr": positive(), "min_lr_ratio": between(0, 1), "weight_decay": between(0, 1),
         "beta1": between(0, 1, open_high=True), "beta2": between(0, 1, open_high=True),
         "warmup_steps": minimum(0), "schedule": choice(*SCHEDULES),
         "grad_clip": minimum(0, integer=False, what="a number >= 0 (0: no clipping)")}
TRAIN = {"steps": minimum(1), "batch_size": minimum(1), "grad_accum": minimum(1),
         "seq_len": minimum(2, optional=True),
         "trainable": choice(*TRAINABLE), "temperature": positive(), "ce_weight": between(0, 1),
         "loss_tile_tokens": minimum(1), "log_every": minimum(1)}

def _fields(stage: str) -> set[str]:
    """The settings a training stage has (align has no trainable set and no logit loss)."""
    return {f.name for f in fields(type(getattr(PrimeConfig(), stage)))}


RULES: dict[str, Rule] = {
    "on_existing": choice(*ON_EXISTING), "device": choice(*DEVICES), "precision": choice(*PRECISIONS),
    "threads": minimum(1, optional=True), "seed": minimum(0),
    "model.family": choice(*SUPPORTED_FAMILIES), "model.attn_implementation": choice(*ATTN_IMPLEMENTATIONS),
    "data.seq_len": minimum(2), "data.num_proc": minimum(1),
    "data.synthetic_mix": between(0, 1, open_high=True,
                                  what="the share of align and distill rows that are synthetic recall rows (0: off)"),
    "data.chat_overflow": choice(*CHAT_OVERFLOW, stage="sft"),
    "select.method": choice(*SELECT_METHODS),
    "select.ratio": between(0, 1, open_low=True, open_high=True,
                            what="the share of attention layers that become GDN, e.g. 0.5"),
    "select.window": minimum(1), "select.metric": choice(*SCORE_METRICS),
    "select.min_distance": minimum(0, optional=True),
    "select.answer_weight": between(0, 1), "select.calibration_rows": minimum(0),
    "select.calibration_seq_len": minimum(2, optional=True), "select.calibration_samples": minimum(0),
    "select.calibration_batch_size": minimum(1), "select.trained_steps": minimum(1),
    "select.trained_batch_size": minimum(1),
    "select.trained_lr": positive(),
    "select.restore_steps": minimum(0, what="an integer >= 0 (0: no retraining between rounds)"),
    "init.gate_init": choice(*GATE_INITS), "init.qk_norm": choice(*QK_NORMS), "init.conv_init": choice(*CONV_INITS),
    "init.kv_heads": choice(*KV_HEADS),
    "align.loss": choice(*ALIGN_LOSSES), "distill.teacher": choice(*DISTILL_TEACHERS),
    "distill.teacher_stream": choice(*TEACHER_STREAMS),
    **{f"{stage}.{key}": rule for stage in TRAIN_STAGES for key, rule in TRAIN.items()
       if key in _fields(stage)},
    **{f"{stage}.optim.{key}": rule for stage in TRAIN_STAGES for key, rule in OPTIM.items()},
    "longctx.rope_theta": positive(), "longctx.max_position_embeddings": minimum(2), "longctx.sp_degree": minimum(1),
    "longctx.tiled_mlp_tokens": minimum(0, what="0 (off) or a positive token count"),
    "eval.heldout_rows": minimum(1), "eval.retrieval_distances": int_list(1), "eval.retrieval_samples": minimum(1),
    "eval.batch_size": minimum(1),
    "eval.chat_prompts": minimum(1), "eval.chat_max_new_tokens": minimum(1),
    "eval.recall_warn_ratio": between(0, 1, what="the share of the teacher's recall below which the summary warns"),
    "eval.kl_warn": positive(),
    "eval.lm_eval_tasks": names(), "eval.lm_eval_limit": minimum(1, optional=True),
    "eval.lm_eval_batch_size": minimum(1),
    "export.dtype": choice(*EXPORT_DTYPES), "export.format": choice(*EXPORT_FORMATS),
    "logger.kind": choice(*LOGGER_KINDS), "logger.mode": choice(*LOGGER_MODES),
    "deepspeed.zero_stage": Rule("0, 1, 2, 3", lambda v: v in (0, 1, 2, 3), 4, choice=True),
    "deepspeed.reduce_bucket_size": minimum(1), "deepspeed.prefetch_bucket_size": minimum(1),
    "deepspeed.param_persistence_threshold": minimum(0), "deepspeed.max_reuse_distance": minimum(0),
    "checkpoint.every_steps": minimum(0, what="an integer >= 0 (0: off)"),
    "checkpoint.every_minutes": minimum(0, integer=False, what="a number >= 0 (0: off)"),
    "checkpoint.keep_last": minimum(1),
}

# Fields with no accepted set or range here: free text, or checked by validate.py (stages, layers)
# and with the inputs (model path, data files: factory.config.environment / data_checks). The
# coverage test requires every non-boolean field to be here or in RULES.
UNCONSTRAINED = {"recipe", "stages", "output_dir", "model.name", "model.path", "data.text_field", "data.cache_dir",
                 "data.train_files", "data.heldout_files", "data.chat_files", "data.chat_heldout_files",
                 "select.calibration_files", "eval.recall_files", "longctx.data_files", "logger.project", "logger.run_name",
                 "select.layers"}
UNCONSTRAINED_PATTERNS: tuple[str, ...] = ()


def lookup(cfg, path: str):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def refuse(path: str, value, rule: Rule) -> ConfigError:
    if rule.choice:
        return ConfigError(f"{path}={value!r} is not accepted; accepted: {rule.accepted}")
    return ConfigError(f"{path}={value} must be {rule.accepted}")


def check_fields(cfg, with_inputs: bool = False) -> None:
    """The rules that need no inputs; ``with_inputs``: those of the stages that will run."""
    for path, rule in RULES.items():
        if with_inputs != (rule.stage is not None) or (rule.stage and rule.stage not in cfg.stages):
            continue
        value = lookup(cfg, path)
        if not rule.ok(value):
            raise refuse(path, value, rule)
