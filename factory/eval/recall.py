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

from pathlib import Path
from typing import Iterable, Sequence

from factory.data.recall_items import RecallItem, read_recall_file, validate_recall_files
from factory.eval.retrieval import TASKS, retrieval_accuracy, score_samples

__all__ = ["RecallItem", "by_task", "compare", "compare_files", "format_table", "read_recall_file",
           "recall_by_distance", "recall_files_accuracy", "score_items", "validate_recall_files"]


def recall_by_distance(model, tokenizer, distances: Iterable[int], samples_per_distance: int, seed: int,
                       tasks: Sequence[str] = TASKS, device: str = "cpu", filler_text: str | None = None) -> dict:
    """Greedy exact-match recall ``{task: {distance: accuracy}}`` on the synthetic tasks; the same
    seed gives the same prompts to every model, so a teacher and its hybrid are scored alike."""
    return retrieval_accuracy(model, tokenizer, distances, samples_per_distance, seed=seed, tasks=tasks,
                              device=device, filler_text=filler_text)


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
