"""Command-line overrides: keys the schema does not know, Hydra's composition errors as one line,
and ``~`` in path fields.

Hydra's struct mode refuses ``align.stpes=5`` but accepts ``+align.stpes=5`` (the ``+`` adds a
key), which the typed config then drops without a word. ``check_known_keys`` compares the
composed config with the ``PrimeConfig`` dataclasses and refuses any key they lack.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing

from omegaconf import DictConfig, OmegaConf

from factory.config.errors import ConfigError
from factory.config.schema import PrimeConfig

PATH_FIELDS = ("output_dir", "model.path", "data.cache_dir")
PATH_LIST_FIELDS = ("data.train_files", "data.heldout_files", "data.chat_files", "data.chat_heldout_files",
                    "select.calibration_files", "longctx.data_files")


def schema_keys(schema: type = PrimeConfig, prefix: str = "") -> dict[str, type | None]:
    """Every dotted field path of the schema; nested dataclasses map to their type, leaves to None."""
    hints = typing.get_type_hints(schema)
    keys: dict[str, type | None] = {}
    for f in dataclasses.fields(schema):
        path, kind = f"{prefix}{f.name}", hints[f.name]
        nested = kind if dataclasses.is_dataclass(kind) else None
        keys[path] = nested
        if nested is not None:
            keys.update(schema_keys(nested, f"{path}."))
    return keys


def _walk(node: dict, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _walk(value, f"{path}.")


def check_known_keys(cfg: DictConfig) -> None:
    known = schema_keys()
    for path in _walk(OmegaConf.to_container(cfg, resolve=False)):
        parent = path.rpartition(".")[0]
        if path not in known and (not parent or known.get(parent) is not None):
            raise unknown_key(path, known)


def unknown_key(path: str, known: dict) -> ConfigError:
    parent, _, leaf = path.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    close = [f"{parent}.{k}" if parent else k for k in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.7)]
    hint = f"did you mean {' or '.join(close)}?" if close else \
        f"known keys{' of ' + parent if parent else ''}: {', '.join(siblings)}"
    return ConfigError(f"unknown key '{path}' (the config has no such setting; a '+' does not add one); {hint}")


def composition_error(err: Exception) -> ConfigError:
    """Hydra's multi-line composition error as one line naming the key, the value and what is accepted."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    text = str(err)
    if key and type(cause).__name__ in ("ConfigAttributeError", "ConfigKeyError"):
        return unknown_key(key, schema_keys())
    if key and type(cause).__name__ == "ValidationError":
        first = str(getattr(cause, "msg", cause)).splitlines()[0]
        expected = re.search(r"converted to (\w+)", first)
        accepted = f"a value of type {expected.group(1).lower()}" if expected else first
        value = re.search(r"override \S+?=(.*)$", text.splitlines()[0])
        shown = value.group(1) if value else "?"
        return ConfigError(f"{key}={shown} is not accepted; accepted: {accepted}")
    if type(err).__name__ == "OverrideParseException":
        return ConfigError(f"cannot parse '{getattr(err, 'override', '?')}' (Hydra's override grammar); quote a value "
                           "with special characters, e.g. key='~/path' or key=['~/a.jsonl']")
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return ConfigError(f"{missing.group(1)}={missing.group(2)} is not accepted; accepted: {', '.join(options)}")
    return ConfigError(f"config: {text.strip().splitlines()[0]}")


def expand_paths(cfg: DictConfig) -> None:
    """``~`` and ``~user`` in every path field, quoted or not (the shell leaves a quoted one alone)."""
    for key in PATH_FIELDS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), merge=False)
    for key in PATH_LIST_FIELDS:
        values = OmegaConf.select(cfg, key)
        if values is not None and any(str(v).startswith("~") for v in values):
            OmegaConf.update(cfg, key, [os.path.expanduser(str(v)) for v in values], merge=False)
