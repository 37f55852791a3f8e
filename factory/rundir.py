"""The run-directory contract.

A pipeline directory holds ``pipeline.yaml`` (the resolved config of the latest run),
``pipeline.json`` (its hash and the stage list) and one directory per stage, ``NN-<stage>/``.
A stage directory describes itself in ``stage.json``: stage name, parent stage directory, its
identity (the settings it read and its parent's hash: ``factory.stages.identity``) and that
identity's hash (``config_hash``), tokens and steps, and ``complete``. ``stage.json`` with
``complete: true`` is written last, atomically, so a directory is complete or it is not.
The next stage reads only its parent's directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

PIPELINE_JSON = "pipeline.json"
STAGE_JSON = "stage.json"
MODEL_SUBDIR = "model"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def config_hash(config: Any) -> str:
    """Stable hash of a dataclass (or plain data) config."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pipeline_identity(cfg) -> dict:
    """The config without run-control fields, hashed into pipeline.json as a record (stages are reused by
    their own identity, not by this)."""
    data = dataclasses.asdict(cfg)
    for key in ("on_existing", "threads", "logger", "checkpoint"):
        data.pop(key, None)
    return data


class PipelineDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def stage_dir(self, index: int, stage: str) -> Path:
        return self.root / f"{index:02d}-{stage}"

    def exists(self) -> bool:
        return self.root.exists() and any(self.root.iterdir())

    def initialize(self, cfg, resolved_yaml: str, overwrite: bool) -> None:
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "pipeline.yaml", resolved_yaml)
        atomic_write_json(self.root / PIPELINE_JSON, {
            "config_hash": config_hash(pipeline_identity(cfg)), "stages": list(cfg.stages),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def is_complete(stage_dir: Path, expected_hash: str | None = None) -> bool:
    path = Path(stage_dir) / STAGE_JSON
    if not path.exists():
        return False
    meta = read_json(path)
    return bool(meta.get("complete")) and (expected_hash is None or meta.get("config_hash") == expected_hash)


def read_stage(stage_dir: Path) -> dict:
    return read_json(Path(stage_dir) / STAGE_JSON)


def mark_complete(stage_dir: Path, stage: str, parent: Path | None, stage_hash: str, **extra) -> None:
    meta = {"stage": stage, "parent": str(parent) if parent else None, "config_hash": stage_hash,
            "complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    atomic_write_json(Path(stage_dir) / STAGE_JSON, meta)


def model_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / MODEL_SUBDIR
