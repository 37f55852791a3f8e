"""In-context recall: greedy exact match by task and distance, and on users' own recall files.

Two sources of recall items, one scorer (``factory.eval.retrieval.score_samples``: the greedy
continuation of the prompt must reproduce the answer's tokens):

- the synthetic tasks (key-value recall, passkey) at chosen distances, through
  ``retrieval.retrieval_accuracy``;
- JSONL files of ``{"prompt": ..., "answer": ...}``, one item a line (``eval.recall_files``). The
  answer follows the prompt directly, so it carries its own leading space (``" 4821"``).

``compare`` puts a hybrid's figures beside its teacher's with the share it keeps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from factory.config.validate import ConfigError
from factory.eval.retrieval import TASKS, retrieval_accuracy, score_samples


@dataclass(frozen=True)
class RecallItem:
    prompt: str
    answer: str


def recall_by_distance(model, tokenizer, distances: Iterable[int], samples_per_distance: int, seed: int,
                       tasks: Sequence[str] = TASKS, device: str = "cpu", filler_text: str | None = None) -> dict:
    """Greedy exact-match recall ``{task: {distance: accuracy}}`` on the synthetic tasks; the same
    seed gives the same prompts to every model, so a teacher and its hybrid are scored alike."""
    return retrieval_accuracy(model, tokenizer, distances, samples_per_distance, seed=seed, tasks=tasks,
                              device=device, filler_text=filler_text)


def read_recall_file(path: str | Path) -> list[RecallItem]:
    """The items of one recall file; any problem is one ``ConfigError`` line naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.recall_files: {path} does not exist (expected a JSONL file of "
                          '{"prompt": ..., "answer": ...} lines)')
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(path, number, line))
    if not items:
        raise ConfigError(f"eval.recall_files: {path} has no recall items")
    return items


def _parse_line(path: Path, number: int, line: str) -> RecallItem:
    where = f"eval.recall_files: {path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f'{where}: expected an object {{"prompt": ..., "answer": ...}}, got {type(row).__name__}')
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str):
            raise ConfigError(f"{where}: needs a string {key!r} (keys present: {', '.join(map(repr, row)) or 'none'})")
    if not row["answer"].strip():
        raise ConfigError(f"{where}: empty 'answer' (greedy exact match needs something to match)")
    return RecallItem(row["prompt"], row["answer"])


def validate_recall_files(paths: Iterable[str | Path]) -> None:
    """Refuse, before any stage runs, a missing file, a line without prompt or answer, an empty answer."""
    for path in paths:
        read_recall_file(path)


def score_items(model, tokenizer, items: Sequence[RecallItem], device: str = "cpu") -> float:
    """Share of items whose greedy continuation reproduces the answer."""
    hits = score_samples(model, tokenizer, items, device)
    return sum(hits) / len(hits)


def recall_files_accuracy(model, tokenizer, paths: Iterable[str | Path], device: str = "cpu") -> dict:
    """``{file name: {"accuracy": a, "items": n}}`` for each recall file (keyed by its name as given)."""
    result = {}
    for path in paths:
        items = read_recall_file(path)
        result[str(path)] = {"accuracy": score_items(model, tokenizer, items, device), "items": len(items)}
    return result


def compare(teacher: dict, hybrid: dict) -> dict:
    """``{task: {distance: {"teacher", "hybrid", "kept"}}}`` from two ``recall_by_distance`` results;
    ``kept`` is the hybrid's share of the teacher's recall (None where the teacher scores 0)."""
    return {task: {d: {"teacher": t, "hybrid": hybrid[task][d], "kept": hybrid[task][d] / t if t else None}
                   for d, t in by_distance.items()}
            for task, by_distance in teacher.items()}


def format_table(comparison: dict) -> str:
    """A markdown table of ``compare``'s result, one row a task and distance."""
    lines = ["| task | distance | teacher | hybrid | kept |", "|---|---|---|---|---|"]
    for task, by_distance in comparison.items():
        for d, row in by_distance.items():
            kept = "n/a" if row["kept"] is None else f"{100 * row['kept']:.0f}%"
            lines.append(f"| {task} | {d} | {row['teacher']:.2f} | {row['hybrid']:.2f} | {kept} |")
    return "\n".join(lines) + "\n"
