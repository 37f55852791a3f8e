"""Writes the data of the local lm-eval tasks, factory/eval/lm_eval_tasks/data/*.jsonl, from the
embedded teacher's own retrieval formats (factory/data/synthetic.py) and its held-out play, seeded,
so a rebuild is byte for byte the same (a unit test checks it):

    python assets/build_lm_eval_tasks.py

- kv_recall.jsonl: four key-value facts, one asked for; the answer is generated (greedy exact match).
- passkey.jsonl: the pass key, generated.
- kv_choice.jsonl: key-value prompts again (other samples), scored by loglikelihood: which of the four
  values in the prompt follows the question.
- continuation.jsonl: held-out play text; which line comes next, the true one or the same words in
  three other orders (loglikelihood: word choice cancels out, only how the words go together counts).

Retrieval distances stay inside the teacher's 512-token training length, where it retrieves. Items take
the distances in turn, so lm-eval's ``--limit`` (the first documents) still spans all of them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script in a checkout, like the other builders here

from transformers import AutoTokenizer  # noqa: E402

from factory.data.synthetic import DEFAULT_FILLER, Filler, kv_sample, passkey_sample, token_counter  # noqa: E402

OUT = ROOT / "factory" / "eval" / "lm_eval_tasks" / "data"
DISTANCES = (32, 128, 256, 448)
FACT = re.compile(r"^Key (\w+) has value (\d+)\.$", re.M)


def _samples(kind: str, per_distance: int, filler: Filler) -> list:
    make = kv_sample if kind.startswith("kv") else passkey_sample
    streams = {d: random.Random(f"lm_eval/{kind}/{d}") for d in DISTANCES}  # one per file and distance
    return [(d, make(streams[d], filler, d)) for _ in range(per_distance) for d in DISTANCES]


def recall_rows(kind: str, per_distance: int, filler: Filler) -> list[dict]:
    return [{"prompt": s.prompt, "target": s.answer.strip(), "distance": d}
            for d, s in _samples(kind, per_distance, filler)]


def choice_rows(per_distance: int, filler: Filler) -> list[dict]:
    rows = []
    for distance, s in _samples("kv_choice", per_distance, filler):
        values = [value for _, value in FACT.findall(s.prompt)]
        assert len(values) == 4 and s.answer.strip() in values, s.prompt
        rows.append({"prompt": s.prompt, "choices": values, "label": values.index(s.answer.strip()),
                     "distance": distance})
    return rows


def _speeches(text: str) -> list[list[str]]:
    """Speeches of the play: a speaker line (``NAME.``) and at least four lines of verse."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.rstrip() for line in para.strip().splitlines()]
        if len(lines) >= 5 and re.fullmatch(r"[A-Z][A-Z ]+\.", lines[0]) and all(lines[1:]):
            out.append(lines)
    return out


def _reorders(rng: random.Random, line: str, n: int) -> list[str]:
    words, out = line.split(), set()
    while len(out) < n:
        order = rng.sample(words, len(words))
        if order != words:
            out.add(" ".join(order))
    return sorted(out)


def continuation_rows(n: int) -> list[dict]:
    """Context: the long speech before it (whole) and this one up to a line of at least six words; choices: that
    line and three orders of its words. Contexts are short: this measures text, not long-range recall."""
    speeches = _speeches(DEFAULT_FILLER.read_text())
    rng = random.Random("lm_eval/continuation")
    rows = []
    for index in sorted(rng.sample(range(1, len(speeches)), n)):
        speech = speeches[index]
        cut = rng.choice([i for i in range(2, len(speech)) if len(speech[i].split()) >= 6] or [len(speech) - 1])
        context = "\n".join(speeches[index - 1]) + "\n\n" + "\n".join(speech[:cut]) + "\n"
        line = " ".join(speech[cut].split())
        choices = [line] + _reorders(rng, line, 3)
        rng.shuffle(choices)
        rows.append({"prompt": context, "choices": choices, "label": choices.index(line)})
    return rows


def build(out: Path = OUT) -> list[Path]:
    # Distances are counted in the teacher's tokens.
    filler = Filler(DEFAULT_FILLER.read_text(), token_counter(AutoTokenizer.from_pretrained(ROOT / "assets" / "teacher")))
    files = {"kv_recall.jsonl": recall_rows("kv_recall", 6, filler),
             "passkey.jsonl": recall_rows("passkey", 4, filler),
             "kv_choice.jsonl": choice_rows(6, filler),
             "continuation.jsonl": continuation_rows(24)}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return [out / name for name in files]


if __name__ == "__main__":
    for path in build():
        print(f"{path}: {sum(1 for _ in path.open())} items, {path.stat().st_size:,} bytes")
