"""Config validation: every bad value is refused in one line, before anything is written.

``validate_static`` looks only at the config; ``validate_inputs`` opens the model's
config.json, its tokenizer and the data files (never the network); ``check_pipeline_dir``
refuses to reuse an output directory made with a different config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from factory.config.schema import STAGES, TRAIN_STAGES, PrimeConfig
from factory.rundir import PIPELINE_JSON, PipelineDir, config_hash, pipeline_identity

# The accepted values, in one place (new selection methods, losses, ... are added here).
SELECT_METHODS = ("manual", "alternate", "swa_proxy", "gdn_proxy", "kl_trained")
SUPPORTED_FAMILIES = ("qwen3",)
ON_EXISTING = ("resume", "overwrite")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TRAINABLE = ("gdn", "gdn+norms", "gdn+norms+attention", "all")
STAGE_LOSSES = {"align": ("layerwise", "pre_lm_head"), "distill": ("kl",), "longctx": ("ce",), "sft": ("ce",)}
SCHEDULES = ("cosine", "constant")
GATE_INITS = ("published", "random")
QK_NORMS = ("drop", "scale")
CONV_INITS = ("default", "identity")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("qwen3_5", "hqwen3")
LOGGER_KINDS = ("none", "wandb")
LOGGER_MODES = ("offline", "online")
LAUNCHER_KINDS = ("local", "torchrun", "slurm")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ConfigError(ValueError):
    """A bad config value or input; the message is one line for the user."""


def _choice(name: str, value, accepted: Iterable) -> None:
    accepted = tuple(accepted)
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")


# ---------------------------------------------------------------- static checks


def validate_static(cfg: PrimeConfig) -> None:
    _check_stages(cfg.stages)
    _check_select(cfg)
    _choice("on_existing", cfg.on_existing, ON_EXISTING)
    _choice("device", cfg.device, DEVICES)
    _choice("precision", cfg.precision, PRECISIONS)
    _positive("threads", cfg.threads)
    _choice("model.family", cfg.model.family, SUPPORTED_FAMILIES)
    _choice("model.attn_implementation", cfg.model.attn_implementation, ATTN_IMPLEMENTATIONS)
    _positive("data.seq_len", cfg.data.seq_len)
    _choice("init.gate_init", cfg.init.gate_init, GATE_INITS)
    _choice("init.qk_norm", cfg.init.qk_norm, QK_NORMS)
    _choice("init.conv_init", cfg.init.conv_init, CONV_INITS)
    for stage in TRAIN_STAGES:
        if hasattr(cfg, stage):
            _check_train_stage(stage, getattr(cfg, stage))
    _choice("export.dtype", cfg.export.dtype, EXPORT_DTYPES)
    _choice("export.format", cfg.export.format, EXPORT_FORMATS)
    _check_export_format(cfg)
    _choice("logger.kind", cfg.logger.kind, LOGGER_KINDS)
    _choice("logger.mode", cfg.logger.mode, LOGGER_MODES)
    _choice("launcher.kind", cfg.launcher.kind, LAUNCHER_KINDS)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; accepted: 0, 1, 2, 3")
    _check_long_context(cfg)


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


def _check_long_context(cfg: PrimeConfig) -> None:
    lc = cfg.longctx
    _positive("longctx.sp_degree", lc.sp_degree)
    if lc.offload_checkpoints and not lc.activation_checkpointing:
        raise ConfigError("longctx.offload_checkpoints=true needs longctx.activation_checkpointing=true")
    if lc.tiled_mlp_tokens < 0:
        raise ConfigError(f"longctx.tiled_mlp_tokens={lc.tiled_mlp_tokens} must be 0 (off) or a positive token count")
    _positive("longctx.rope_theta", lc.rope_theta)
    seq_len = lc.seq_len or cfg.data.seq_len
    if seq_len % lc.sp_degree:
        raise ConfigError(f"longctx.seq_len={seq_len} is not divisible by longctx.sp_degree={lc.sp_degree}")
    if lc.max_position_embeddings < seq_len:
        raise ConfigError(f"longctx.max_position_embeddings={lc.max_position_embeddings} is below the row "
                          f"length {seq_len}")
    if lc.sp_degree > 1 and "longctx" in cfg.stages and not cfg.deepspeed.enabled:
        raise ConfigError(f"longctx.sp_degree={lc.sp_degree} needs several processes: use deepspeed=zero3 "
                          "and launch with torchrun or SLURM")


def _check_stages(stages: list[str]) -> None:
    if not stages:
        raise ConfigError(f"stages is empty; accepted: a list from {', '.join(STAGES)}")
    for name in stages:
        _choice("stages", name, STAGES)
    for name in set(stages):
        if stages.count(name) > 1:
            raise ConfigError(f"stages: '{name}' is listed twice; each stage runs once")
    order = [STAGES.index(name) for name in stages]
    if order != sorted(order):
        raise ConfigError(f"stages [{', '.join(stages)}] are out of order; pipeline order: {', '.join(STAGES)}")


def _check_select(cfg: PrimeConfig) -> None:
    sel = cfg.select
    _choice("select.method", sel.method, SELECT_METHODS)
    if not 0.0 < sel.ratio < 1.0:
        raise ConfigError(f"select.ratio={sel.ratio} is outside (0, 1); accepted: the share of attention "
                          "layers that become GDN, strictly between 0 and 1 (e.g. 0.5)")
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


def _check_train_stage(stage: str, tcfg) -> None:
    _choice(f"{stage}.trainable", tcfg.trainable, TRAINABLE)
    if stage in STAGE_LOSSES:
        _choice(f"{stage}.loss", tcfg.loss, STAGE_LOSSES[stage])
    _choice(f"{stage}.optim.schedule", tcfg.optim.schedule, SCHEDULES)
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "temperature", "loss_tile_tokens"):
        _positive(f"{stage}.{key}", getattr(tcfg, key))
    _positive(f"{stage}.optim.lr", tcfg.optim.lr)
    if tcfg.optim.warmup_steps < 0:
        raise ConfigError(f"{stage}.optim.warmup_steps={tcfg.optim.warmup_steps} must be >= 0")


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
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"model.path '{cfg.model.path}' has no weights; accepted: a checkpoint directory "
                          f"with one of {', '.join(WEIGHT_FILES)}")
    if cfg.select.method == "manual" and cfg.select.layers:
        _check_layer_indices(cfg.select.layers, int(model_config["num_hidden_layers"]))
    tokenizer = _check_tokenizer(cfg.model.path, model_dir, int(model_config["vocab_size"]))
    for key in ("train_files", "heldout_files"):
        _check_data_files(f"data.{key}", getattr(cfg.data, key), cfg.data.text_field)
    if "longctx" in cfg.stages:
        _check_data_files("longctx.data_files", cfg.longctx.data_files, cfg.data.text_field)
    if "sft" in cfg.stages:
        _check_chat(cfg, tokenizer)


def _check_chat(cfg: PrimeConfig, tokenizer) -> None:
    """sft needs a chat template and readable conversations with known roles."""
    from factory.data.chat import OVERFLOW, ChatDataError, read_conversations

    _choice("data.chat_overflow", cfg.data.chat_overflow, OVERFLOW)
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
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"data file '{path}' line {number} is not JSON; accepted: JSONL of "
                                  f"{{\"{text_field}\": ...}} lines") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                return True
    return False


# ---------------------------------------------------------------- output directory


def check_pipeline_dir(cfg: PrimeConfig) -> None:
    """Refuse to resume a directory made with another config, and never adopt a foreign directory."""
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir '{cfg.output_dir}' is a file; accepted: a new or pipeline directory")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not (root / PIPELINE_JSON).is_file():
        raise ConfigError(f"output_dir '{cfg.output_dir}' exists and is not a pipeline directory "
                          f"(no {PIPELINE_JSON}); accepted: a new or empty output_dir")
    try:
        recorded = PipelineDir(root).recorded_hash()
    except (OSError, ValueError, KeyError, TypeError):
        recorded = "unreadable"
    current = config_hash(pipeline_identity(cfg))
    if recorded != current and cfg.on_existing != "overwrite":
        raise ConfigError(f"output_dir '{cfg.output_dir}' holds a pipeline made with a different config "
                          f"(hash {recorded}, now {current}); rerun with on_existing=overwrite or a new output_dir")
