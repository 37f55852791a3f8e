"""Synthetic in-context recall rows mixed into the align and distill data (``data.synthetic_mix``).

Users' training text rarely holds recall tasks, yet in-context recall is what converted layers lose
first (issue 15). So a share of the rows those stages read is synthetic: key-value recall (several
facts, a gap, then questions each answered in place) and passkey documents from
``factory.data.synthetic``, tokenized with the teacher's tokenizer, one document a row, with the gap
between fact and question drawn up to what the row leaves beside the facts and questions.

Held out from the eval: the haystack is the user's own training text (decoded from the first packed
rows), not the eval's held-out play, and the rows come from their own seeded stream
(``synthetic-mix/<seed>/<row>``), apart from the eval's (``<seed>/<task>/<distance>``).

``MixedRows`` puts the synthetic rows behind ``PackedRows``' interface, after the user's: the loader's
permutation runs over both, and synthetic row ``j`` is built when a batch asks for it, from
``(seed, j)`` alone. The data after a resume therefore equals the data straight through with no state
of its own (the loader's position is all), each data-parallel rank builds only the rows it reads, and
a short run pays only for those.
"""

from __future__ import annotations

import random
import re

import torch

from factory.data.packing import PackedRows, pack_token_lists
from factory.data.synthetic import Filler, token_counter, training_document

# Key-value rows carry distractor facts and several questions each (denser supervision, and the
# harder task); passkey rows carry one fact.
KINDS = ("kv", "passkey")
KIND_WEIGHTS = (2, 1)
# Haystack read from the start of the user's rows: enough distinct text that gaps rarely repeat,
# small enough to tokenize in a moment.
FILLER_TOKENS = 200_000
# A paragraph that states or asks a fact in the recall templates would be a second, wrong answer
# inside a haystack (the embedded data holds such documents).
TEMPLATE = re.compile(r"has value|pass key", re.IGNORECASE)


def filler_from_rows(rows: PackedRows, tokenizer, max_tokens: int = FILLER_TOKENS) -> Filler:
    """Haystack paragraphs of the user's own text: the documents of the first rows, decoded, split at
    blank lines, without paragraphs in the recall templates. Packed rows are consecutive cuts of one
    token stream, so the documents are the pieces between EOS tokens, whole across row cuts."""
    seq_len = rows.input_ids.shape[1]
    n = max(1, min(len(rows), -(-max_tokens // seq_len)))
    ids = rows.input_ids[:n].reshape(-1)
    ends = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
    bounds = [0, *(e + 1 for e in ends), ids.numel()]
    docs = tokenizer.batch_decode([ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:]) if b > a],
                                  skip_special_tokens=True)
    paragraphs = [p.strip() for doc in docs for p in re.split(r"\n\s*\n", doc)]
    kept = [p for p in paragraphs if p and not TEMPLATE.search(p)]
    if not kept:
        raise ValueError("data.synthetic_mix needs filler text: the training rows hold no paragraph outside "
                         "the recall templates")
    return Filler("\n\n".join(kept), token_counter(tokenizer))


class RecallRows:
    """Synthetic recall row ``j`` of ``seq_len`` tokens, a function of ``(seed, j)`` alone."""

    def __init__(self, tokenizer, filler: Filler, seq_len: int, seed: int):
        self.tokenizer, self.filler, self.seq_len, self.seed = tokenizer, filler, seq_len, seed

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def document(self, j: int) -> str:
        """The recall document of row ``j`` (answers written out), about ``seq_len`` tokens."""
        rng = random.Random(f"synthetic-mix/{self.seed}/{j}")
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
        return training_document(rng, self.filler, kind, self.seq_len, max_distance=self.seq_len)

    def row(self, j: int) -> PackedRows:
        """Row ``j``: its document, cut to the row (the cut falls in the filler tail after the answers)."""
        docs = [self._encode(self.document(j))]
        rng = random.Random(f"synthetic-mix/{self.seed}/{j}/tail")
        while sum(len(d) + 1 for d in docs) < self.seq_len:  # token counts of pieces can undershoot the whole
            docs.append(self._encode(self.filler.take(rng, self.seq_len)))
        rows = pack_token_lists(docs, self.tokenizer.eos_token_id, self.seq_len)
        return PackedRows(rows.input_ids[:1], rows.position_ids[:1], rows.labels[:1])


class MixedRows:
    """The user's packed rows followed by ``count`` synthetic recall rows, with ``PackedRows``' interface
    (``len`` and ``batch``) for the loader."""

    def __init__(self, rows: PackedRows, recall: RecallRows, count: int):
        self.rows, self.recall, self.count = rows, recall, count

    def __len__(self) -> int:
        return len(self.rows) + self.count

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        parts = [self.rows.batch(torch.tensor([i])) if i < n else self.recall.row(i - n).batch(torch.tensor([0]))
                 for i in index.tolist()]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def synthetic_count(user_rows: int, mix: float) -> int:
    """Synthetic rows that make up ``mix`` of all rows (at least one when ``mix`` > 0)."""
    return max(1, round(user_rows * mix / (1 - mix))) if mix > 0 else 0


def mix_recall_rows(rows: PackedRows, tokenizer, mix: float, seed: int) -> PackedRows | MixedRows:
    """``rows`` with synthetic recall rows added to make up ``mix`` of the whole (``rows`` itself at 0)."""
    if mix <= 0:
        return rows
    recall = RecallRows(tokenizer, filler_from_rows(rows, tokenizer), rows.input_ids.shape[1], seed)
    return MixedRows(rows, recall, synthetic_count(len(rows), mix))
