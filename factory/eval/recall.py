"""In-context recall: greedy exact match by task and distance, and on users' own recall files.

Two sources of recall items, one scorer (``factory.eval.retrieval.score_samples``: the greedy
continuation of the prompt must reproduce the answer's tokens):

- the synthetic tasks (key-value recall, passkey) at chosen distances, through
  ``retrieval.retrieval_accuracy``;
- JSONL files of ``{"prompt": ..., "answer": ...}``, one item a line (``eval.recall_files``). The
  answer follows the prompt directly, so it carries its own leading space (``" 4821"``).

``compare`` puts a hybrid's figures beside its teacher's with the share it keeps; ``by_task`` sums
them up per task; ``compare_files`` does the same for the users' files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from factory.config.errors import ConfigError
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
    path = Path(path)
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


def by_task(comparison: dict, max_distance: int | None = None) -> dict:
    """``{task: {"teacher", "hybrid", "kept", "distances"}}``: mean recall over the distances up to
    ``max_distance`` (the training length: beyond it a teacher need not retrieve, and a hybrid's hits
    there would inflate its share), or over all of them when none is that close."""
    out = {}
    for task, by_distance in comparison.items():
        inside = [d for d in by_distance if max_distance is None or int(d) <= max_distance] or list(by_distance)
        teacher = sum(by_distance[d]["teacher"] for d in inside) / len(inside)
        hybrid = sum(by_distance[d]["hybrid"] for d in inside) / len(inside)
        out[task] = {"teacher": teacher, "hybrid": hybrid, "kept": hybrid / teacher if teacher else None,
                     "distances": [int(d) for d in inside]}
    return out


def compare_files(teacher: dict, hybrid: dict) -> dict:
    """``{file: {"teacher", "hybrid", "kept", "items"}}`` from two ``recall_files_accuracy`` results."""
    return {name: {"teacher": t["accuracy"], "hybrid": hybrid[name]["accuracy"],
                   "kept": hybrid[name]["accuracy"] / t["accuracy"] if t["accuracy"] else None, "items": t["items"]}
            for name, t in teacher.items()}
