"""Checks of the machine and the model files: device, launch mode, optional packages, weights,
tokenizer. Each refuses in one line before anything is written; none loads a model."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

from factory.config.errors import ConfigError
from factory.config.schema import PrimeConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LAUNCH_HINT = ("launch with torchrun (launch/torchrun.sh --nproc N -- <overrides>) or SLURM "
               "(launch/submit.sh), or drop deepspeed (deepspeed=none) for one process")


def launched_world_size() -> int:
    """Processes in this job as torchrun or srun announce them; 0 when started as a plain process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    return tasks if tasks > 1 and "SLURM_PROCID" in os.environ else 0


def check_environment(cfg: PrimeConfig) -> None:
    check_device(cfg)
    check_launch(cfg)
    check_lm_eval(cfg)


def check_lm_eval(cfg: PrimeConfig) -> None:
    if cfg.eval.lm_eval_tasks and "eval" in cfg.stages and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.lm_eval_tasks needs the lm-eval package, which is not installed; accepted: "
                          "pip install -e '.[lmeval]' (lm-eval 0.4.13), or eval.lm_eval_tasks=[]")


def check_device(cfg: PrimeConfig) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError(f"device='cuda' but CUDA is not available here (torch {torch.__version__}, "
                          f"{torch.cuda.device_count()} GPUs visible); accepted here: device=auto or device=cpu")
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation='flash_attention_2' needs the flash-attn package, which is "
                          "not installed; accepted: sdpa, eager, or install flash-attn (CUDA only)")
    if cfg.device == "cpu" or not cuda:
        raise ConfigError("model.attn_implementation='flash_attention_2' runs on CUDA only; accepted on CPU: "
                          "sdpa, eager")


def check_launch(cfg: PrimeConfig) -> None:
    world = launched_world_size()
    if cfg.deepspeed.enabled:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed.enabled=true needs the deepspeed package, which is not installed; "
                              "accepted: deepspeed=none, or install deepspeed")
        if world == 0:
            raise ConfigError(f"deepspeed.enabled=true (deepspeed=zero3) was started as a plain process; {LAUNCH_HINT}")
    elif world > 1:
        raise ConfigError(f"{world} processes were launched but deepspeed is off; accepted: deepspeed=zero3 "
                          "with several processes, or one process without it")


def check_weights(name: str, model_dir: Path) -> None:
    """The weight files exist and a safetensors header is whole (a truncated download is named)."""
    present = [f for f in WEIGHT_FILES if (model_dir / f).is_file()]
    if not present:
        raise ConfigError(f"model.path '{name}' has no weights; accepted: a checkpoint directory with one of "
                          f"{', '.join(WEIGHT_FILES)}")
    if present[0] == "model.safetensors":
        check_safetensors(model_dir / "model.safetensors")
    elif present[0] == "model.safetensors.index.json":
        for shard in _index_shards(model_dir / present[0]):
            check_safetensors(model_dir / shard)


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"'{index}' is not a safetensors index (no weight_map); the checkpoint is damaged") from None
    return sorted(set(weight_map.values()))


def check_safetensors(path: Path) -> None:
    """Header length, header JSON and the file size it implies: no tensor is read."""
    if not path.is_file():
        raise ConfigError(f"weights file '{path}' is missing; the checkpoint is incomplete")
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length)) if 8 + length <= size else None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"weights file '{path}' is damaged ({size:,} bytes, no readable safetensors header); "
                          "download or copy it again")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + length + end:
        raise ConfigError(f"weights file '{path}' is truncated ({size:,} bytes, its header needs "
                          f"{8 + length + end:,}); download or copy it again")


def check_tokenizer_files(name: str, model_dir: Path) -> None:
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.path '{name}' has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                          "accepted: a checkpoint directory saved with its tokenizer")
