"""A stage's identity: the inputs that decide its artifact, recorded in its stage.json so a rerun
can name what changed.

    {"config": {<its slice, minus ignored fields>}, "shared": {<dotted path>: value}, "parent": <hash>}
"""

from __future__ import annotations

import dataclasses

from factory.config.schema import PrimeConfig
from factory.rundir import config_hash
from factory.stages.base import Stage


def _get(cfg, path: str):
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def stage_identity(stage: Stage, cfg: PrimeConfig, device: str, precision: str, parent_hash: str | None) -> dict:
    resolved = {"device": device, "precision": precision}
    own = {}
    if stage.slice is not None:
        own = {k: v for k, v in _get(cfg, stage.slice).items() if k not in stage.ignored}
    shared = {path: resolved[path] if path in resolved else _get(cfg, path) for path in stage.shared}
    return {"config": own, "shared": shared, "parent": parent_hash}


def identity_hash(identity: dict) -> str:
    return config_hash(identity)


def _flatten(data, prefix: str) -> dict:
    if isinstance(data, dict):
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: data}


def changed_settings(stage: Stage, old: dict | None, new: dict) -> list[str]:
    """``key: old -> new`` for each setting that differs, as the user would write the key."""
    if not old:
        return ["(no identity recorded)"]
    changes = []
    for part, prefix in (("config", stage.slice or ""), ("shared", "")):
        before, after = _flatten(old.get(part, {}), prefix), _flatten(new[part], prefix)
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                changes.append(f"{key}: {before.get(key, '<unset>')} -> {after.get(key, '<unset>')}")
    if not changes and old.get("parent") != new["parent"]:
        changes.append("an earlier stage")
    return changes
