"""Users' recall items: JSONL of ``{"prompt": ..., "answer": ...}``, one item a line, read for the eval
stage (``eval.recall_files``) and for select's calibration (``select.calibration_files``, where text
files are accepted too: the format is told by the keys of the first record). Every problem is one
``ConfigError`` line naming the setting, the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from factory.config.errors import ConfigError


@dataclass(frozen=True)
class RecallItem:
    prompt: str
    answer: str


def is_recall_file(path: str | Path) -> bool:
    """Whether a data file is in the recall format: its first record has a ``prompt`` or an ``answer``
    key (a text file has the text field instead). Unreadable or missing files are not recall files."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and ("prompt" in row or "answer" in row)
    return False


def split_calibration_files(files: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """``select.calibration_files`` as (text files, recall files): both formats are accepted."""
    files = list(files or [])
    recall = [f for f in files if is_recall_file(Path(f).expanduser())]
    return [f for f in files if f not in recall], recall


def read_recall_file(path: str | Path, key: str = "eval.recall_files") -> list[RecallItem]:
    """The items of one recall file; any problem is one ``ConfigError`` line naming the setting
    (``key``), the file and the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (expected a JSONL file of "
                          '{"prompt": ..., "answer": ...} lines)')
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(path, number, line, key))
    if not items:
        raise ConfigError(f"{key}: {path} has no recall items")
    return items


def _parse_line(path: Path, number: int, line: str, key: str) -> RecallItem:
    where = f"{key}: {path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f'{where}: expected an object {{"prompt": ..., "answer": ...}}, got {type(row).__name__}')
    for field in ("prompt", "answer"):
        if not isinstance(row.get(field), str):
            raise ConfigError(f"{where}: needs a string {field!r} (keys present: {', '.join(map(repr, row)) or 'none'})")
    if not row["answer"].strip():
        raise ConfigError(f"{where}: empty 'answer' (greedy exact match needs something to match)")
    return RecallItem(row["prompt"], row["answer"])


def validate_recall_files(paths: Iterable[str | Path], key: str = "eval.recall_files") -> None:
    """Refuse, before any stage runs, a missing file, a line without prompt or answer, an empty answer."""
    for path in paths:
        read_recall_file(path, key)
