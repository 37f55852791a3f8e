"""Config validation: every bad value is refused in one line, before anything is written.

``validate`` runs them all, cheapest first: ``validate_static`` looks only at the config
(value ranges: ``factory.config.ranges``; stage order); ``check_environment`` at the machine
and the launch (``factory.config.environment``); ``validate_inputs`` opens the model's
config.json, weight headers, tokenizer and data files (never the network, never the weights);
``check_pipeline_dir`` refuses to reuse an output directory made with a different config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from factory.config.data_checks import SCORING, check_data_lengths, check_positions, iter_texts
from factory.config.environment import check_environment, check_tokenizer_files, check_weights, launched_world_size
from factory.config.errors import ConfigError
from factory.config.ranges import SUPPORTED_FAMILIES, check_fields
from factory.config.schema import STAGES, PrimeConfig
from factory.rundir import PIPELINE_JSON

__all__ = ["ConfigError", "check_environment", "check_pipeline_dir", "resolve_model_path", "validate",
           "validate_inputs", "validate_static"]



def _choice(name: str, value, accepted: Iterable) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def validate(cfg: PrimeConfig) -> None:
    """Every check, cheapest first; nothing is written and no model is loaded."""
    validate_static(cfg)
    check_environment(cfg)
    validate_inputs(cfg)
    check_pipeline_dir(cfg)


# ---------------------------------------------------------------- static checks


def validate_static(cfg: PrimeConfig) -> None:
    _check_stages(cfg)
    check_fields(cfg)
    _check_select(cfg)
    _check_export_format(cfg)
    _check_lm_eval(cfg)
    _check_long_context(cfg)
    _check_distill_teacher(cfg)


def _check_distill_teacher(cfg: PrimeConfig) -> None:
    """The shared teacher is the student's own weights: only GDN may train, or the teacher would drift."""
    if "distill" in cfg.stages and cfg.distill.teacher == "shared" and cfg.distill.trainable != "gdn":
        raise ConfigError(f"distill.teacher=shared needs distill.trainable=gdn (now {cfg.distill.trainable}: it trains "
                          "weights the teacher stream shares); use distill.teacher=auto or separate")


def _check_export_format(cfg: PrimeConfig) -> None:
    """Options the Qwen3.5 format cannot express, refused before any training when export is a stage."""
    if "export" not in cfg.stages or cfg.export.format != "qwen3_5":
        return
    if cfg.init.allow_neg_eigval:
        raise ConfigError("export.format=qwen3_5 cannot hold init.allow_neg_eigval=true (Qwen3.5's GDN has beta "
                          "in (0, 1)); use export.format=hqwen3")
    if cfg.init.qk_norm == "scale":
        raise ConfigError("export.format=qwen3_5 cannot hold init.qk_norm=scale (Qwen3.5's GDN has no per-channel "
                          "q/k scale); use export.format=hqwen3")


def _check_lm_eval(cfg: PrimeConfig) -> None:
    """lm-eval runs on the export as a user gets it, loaded by stock transformers (no trust_remote_code)."""
    tasks = cfg.eval.lm_eval_tasks
    if not tasks or "eval" not in cfg.stages:
        return
    named = f"eval.lm_eval_tasks=[{','.join(tasks)}]"
    if "export" not in cfg.stages:
        raise ConfigError(f"{named} runs on the export, but stages=[{','.join(cfg.stages)}] has no export; "
                          "accepted: export before eval in stages, or eval.lm_eval_tasks=[]")
    if cfg.export.format != "qwen3_5":
        raise ConfigError(f"{named} needs export.format=qwen3_5, which stock transformers loads (export.format="
                          f"{cfg.export.format} needs our code); accepted: export.format=qwen3_5, or eval.lm_eval_tasks=[]")


def _check_long_context(cfg: PrimeConfig) -> None:
    lc = cfg.longctx
    if lc.offload_checkpoints and not lc.activation_checkpointing:
        raise ConfigError("longctx.offload_checkpoints=true needs longctx.activation_checkpointing=true")
    seq_len = lc.seq_len or cfg.data.seq_len
    if seq_len % lc.sp_degree:
        raise ConfigError(f"longctx.seq_len={seq_len} is not divisible by longctx.sp_degree={lc.sp_degree}")
    if lc.max_position_embeddings < seq_len:
        raise ConfigError(f"longctx.max_position_embeddings={lc.max_position_embeddings} is below the row "
                          f"length {seq_len}")
    if lc.sp_degree > 1 and "longctx" in cfg.stages and not cfg.deepspeed.enabled:
        raise ConfigError(f"longctx.sp_degree={lc.sp_degree} needs several processes: use deepspeed=zero3 "
                          "and launch with torchrun or SLURM")


def _check_stages(cfg: PrimeConfig) -> None:
    stages = cfg.stages
    if not stages:
        raise ConfigError(f"stages is empty; accepted: a list from {', '.join(STAGES)} starting with select, init")
    for name in stages:
        _choice("stages", name, STAGES)
    for name in set(stages):
        if stages.count(name) > 1:
            raise ConfigError(f"stages: '{name}' is listed twice; each stage runs once")
    order = [STAGES.index(name) for name in stages]
    if order != sorted(order):
        raise ConfigError(f"stages [{', '.join(stages)}] are out of order; pipeline order: {', '.join(STAGES)}")
    _check_parents(cfg)


def _check_parents(cfg: PrimeConfig) -> None:
    """Each stage reads its parent's output: init the layer choice of select, the rest init's model."""
    stages, listed = cfg.stages, f"stages=[{','.join(cfg.stages)}]"
    rule = "a stage list must start with select, init (select alone is allowed)"
    if stages[0] != "select":
        parent = "select's layer choice" if stages[0] == "init" else "the model of init (and init needs select)"
        raise ConfigError(f"{listed}: {stages[0]} needs {parent}, which is not in the list; {rule}, e.g. "
                          f"stages=[select,init{',' if stages[0] != 'init' else ''}"
                          f"{','.join(s for s in stages if s != 'init')}]")
    if len(stages) > 1 and stages[1] != "init":
        raise ConfigError(f"{listed}: {stages[1]} needs the model of init, which is not in the list; {rule}")
    zero3 = cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3
    if zero3 and len(stages) > 2 and stages[2] in ("distill", "longctx", "sft", "eval"):
        raise ConfigError(f"{listed}: under ZeRO-3, {stages[2]} starts from align's student (init's model keeps "
                          "the teacher attention); add align after init")


def _check_select(cfg: PrimeConfig) -> None:
    sel = cfg.select
    if sel.method in SCORING and not (sel.calibration_rows or sel.calibration_samples):
        raise ConfigError(f"select.method={sel.method} scores layers on calibration data, but "
                          "select.calibration_rows=0 and select.calibration_samples=0; accepted: either > 0")
    if sel.greedy and sel.method in ("kl_trained", "kl_restore"):  # scoring would refuse it only after loading
        why = "it restores layers in greedy rounds already" if sel.method == "kl_restore" else "it scores each layer once"
        raise ConfigError(f"select.greedy=true with select.method={sel.method} ({why}); accepted: "
                          "select.greedy=true with select.method=swa_proxy or gdn_proxy")
    if sel.method != "manual":
        if sel.layers is not None:
            raise ConfigError(f"select.layers={sel.layers} is only used with select.method=manual "
                              f"(got select.method={sel.method})")
        return
    if not sel.layers:
        raise ConfigError(f"select.layers={sel.layers} but select.method=manual needs a non-empty list of "
                          "layer indices, e.g. select.layers=[1,3,5]")
    _check_layer_indices(sel.layers, None)


def _check_layer_indices(layers: list[int], num_layers: Optional[int]) -> None:
    seen = set()
    for index in layers:
        if index < 0 or (num_layers is not None and index >= num_layers):
            bound = f"0..{num_layers - 1} for a {num_layers}-layer model" if num_layers else "indices >= 0"
            raise ConfigError(f"select.layers: index {index} is out of range; accepted: {bound}")
        if index in seen:
            raise ConfigError(f"select.layers: index {index} is repeated; each layer may appear once")
        seen.add(index)


# ---------------------------------------------------------------- inputs (files)


def resolve_model_path(path: str) -> Optional[Path]:
    """A local checkpoint directory, or the cached snapshot of a hub id; None if neither (no download)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id=path, filename="config.json")
    except ValueError:  # HFValidationError: not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def validate_inputs(cfg: PrimeConfig) -> None:
    model_dir = resolve_model_path(cfg.model.path)
    if model_dir is None:
        raise ConfigError(f"model.path '{cfg.model.path}' not found: give a local checkpoint directory "
                          "or a hub id already in the HF cache")
    model_config = _read_model_config(cfg.model.path, model_dir)
    check_weights(cfg.model.path, model_dir)
    if cfg.select.method == "manual" and cfg.select.layers:
        _check_layer_indices(cfg.select.layers, int(model_config["num_hidden_layers"]))
    check_positions(cfg, int(model_config.get("max_position_embeddings") or 0) or 2**31)
    check_tokenizer_files(cfg.model.path, model_dir)
    tokenizer = _check_tokenizer(cfg.model.path, model_dir, int(model_config["vocab_size"]))
    data_keys = [("data", "train_files"), ("data", "heldout_files")]
    if "longctx" in cfg.stages:
        data_keys.append(("longctx", "data_files"))
    for section, key in data_keys:
        _check_data_files(f"{section}.{key}", getattr(getattr(cfg, section), key), cfg.data.text_field)
    _check_recall_files(cfg)
    if cfg.eval.lm_eval_tasks and "eval" in cfg.stages:
        from factory.eval.harness import check_tasks

        check_tasks(cfg.eval.lm_eval_tasks)
    check_data_lengths(cfg, tokenizer, max(1, launched_world_size()))
    if "sft" in cfg.stages:
        _check_chat(cfg, tokenizer)


def _check_recall_files(cfg: PrimeConfig) -> None:
    """The user's recall files (eval) and calibration files (select), each either text or recall items
    (``{"prompt", "answer"}``, told apart by the keys of the first record)."""
    from factory.data.recall_items import split_calibration_files, validate_recall_files

    if "eval" in cfg.stages:
        validate_recall_files(cfg.eval.recall_files)
    text, recall = split_calibration_files(cfg.select.calibration_files)
    if text:
        _check_data_files("select.calibration_files", text, cfg.data.text_field)
    validate_recall_files([Path(f).expanduser() for f in recall], "select.calibration_files")
    if recall and "select" in cfg.stages and cfg.select.answer_weight == 0:
        raise ConfigError(f"select.calibration_files: {', '.join(recall)} hold recall items, scored on their "
                          "answers, but select.answer_weight=0 leaves no weight to answers; accepted: "
                          "select.answer_weight > 0, or text files only")


def _check_chat(cfg: PrimeConfig, tokenizer) -> None:
    """sft needs a chat template and readable conversations with known roles."""
    from factory.data.chat import ChatDataError, read_conversations

    check_fields(cfg, with_inputs=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.path '{cfg.model.path}': the tokenizer has no chat template, which the sft "
                          "stage needs; accepted: a tokenizer with chat_template, or drop sft from stages")
    for key in ("chat_files", "chat_heldout_files"):
        files = getattr(cfg.data, key)
        missing = [f for f in files if not Path(f).is_file()]
        if missing or not files:
            raise ConfigError(f"data.{key}: file(s) {missing or files} not found; accepted: JSONL of "
                              "{\"messages\": [{\"role\", \"content\"}]}")
        try:
            read_conversations(files)
        except (ChatDataError, json.JSONDecodeError) as err:
            raise ConfigError(f"data.{key}: {err}") from None


def _read_model_config(name: str, model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path '{name}' has no config.json; accepted: a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.path '{name}': config.json is not valid JSON ({err})") from None
    family = config.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"model family '{family}' is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
                          f" (model.path '{name}')")
    return config


def _check_tokenizer(name: str, model_dir: Path, vocab_size: int):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.path '{name}': no usable tokenizer ({first}); accepted: a checkpoint "
                          "directory with its tokenizer files") from None
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"model.path '{name}': tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocab_size is {vocab_size}; the tokenizer must not exceed the model vocabulary")
    return tokenizer


def _check_data_files(key: str, files: list[str], text_field: str) -> None:
    if not files:
        raise ConfigError(f"{key} is empty; accepted: a list of JSONL files with a '{text_field}' field")
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}: '{name}' not found; accepted: an existing JSONL file of "
                              f"{{\"{text_field}\": ...}} lines")
        if not _has_text_record(path, text_field):
            raise ConfigError(f"{key}: '{name}' is empty (no line with a non-blank '{text_field}' field); "
                              f"accepted: JSONL with {{\"{text_field}\": ...}} lines")


def _has_text_record(path: Path, text_field: str) -> bool:
    """True at the first usable record, so a large file costs one line, not a full scan."""
    return any(text.strip() for text in iter_texts(path, text_field))


# ---------------------------------------------------------------- output directory


def check_pipeline_dir(cfg: PrimeConfig) -> None:
    """Never adopt a foreign directory. A pipeline directory made with other settings is fine: each stage
    reruns or is reused by its own identity (factory.pipeline)."""
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir '{cfg.output_dir}' is a file; accepted: a new or pipeline directory")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not (root / PIPELINE_JSON).is_file():
        raise ConfigError(f"output_dir '{cfg.output_dir}' exists and is not a pipeline directory "
                          f"(no {PIPELINE_JSON}); accepted: a new or empty output_dir")
