"""``data.synthetic_mix``: synthetic recall rows mixed into align's and distill's rows, built with the
teacher's tokenizer from the user's own text, deterministic per seed, resume-exact, held out from the eval."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from factory.data.loader import RowLoader
from factory.data.packing import IGNORE_INDEX, pack_token_lists
from factory.data.synthetic import DEFAULT_FILLER, Filler, make_samples, token_counter
from factory.data.synthetic_mix import MixedRows, filler_from_rows, mix_recall_rows, synthetic_count

ROOT = Path(__file__).resolve().parents[2]
SEQ = 256
MIX = 0.25


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "assets" / "teacher")


def pack(tokenizer, paragraphs):
    docs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in paragraphs]
    return pack_token_lists(docs, tokenizer.eos_token_id, SEQ)


@pytest.fixture(scope="module")
def rows(tokenizer):
    """A user's text without recall tasks: paragraphs of a training play."""
    text = (ROOT / "assets" / "corpus" / "hamlet.txt").read_text()
    return pack(tokenizer, [p for p in text.split("\n\n") if p.strip()][:300])


def synthetic_indices(mixed: MixedRows, n: int) -> torch.Tensor:
    return torch.arange(len(mixed.rows), len(mixed.rows) + n)


def test_share_of_rows_shapes_and_labels(rows, tokenizer):
    assert mix_recall_rows(rows, tokenizer, 0.0, seed=0) is rows  # off: the user's rows untouched
    mixed = mix_recall_rows(rows, tokenizer, MIX, seed=0)
    assert mixed.count == synthetic_count(len(rows), MIX) == round(len(rows) * MIX / (1 - MIX))
    assert len(mixed) == len(rows) + mixed.count and abs(mixed.count / len(mixed) - MIX) < 1 / len(mixed)
    batch = mixed.batch(torch.tensor([0, len(rows), 3, len(rows) + 1]))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ)
    assert torch.equal(batch["input_ids"][0], rows.input_ids[0]) and torch.equal(batch["labels"][2], rows.labels[3])
    ids, labels = batch["input_ids"][1], batch["labels"][1]
    kept = labels[:-1] != IGNORE_INDEX
    assert torch.equal(labels[:-1][kept], ids[1:][kept]) and kept.float().mean() > 0.95
    assert batch["position_ids"][1, 0] == 0


def distance_to_question(text: str, count) -> int:
    """Tokens between the end of the first asked fact and its question."""
    key = re.search(r"What value does key (\w+) have\?", text)
    if key:
        fact = text.index(f"Key {key.group(1)} has value")
        return count(text[text.index(".", fact) + 1:key.start()])
    return count(text[text.index("Remember it.") + len("Remember it."):text.index("What is the pass key?")])


def test_rows_are_answered_recall_tasks_at_distances_up_to_the_row(rows, tokenizer):
    mixed = mix_recall_rows(rows, tokenizer, MIX, seed=0)
    count = token_counter(tokenizer)
    distances, kinds = [], set()
    for j in range(24):
        document = mixed.recall.document(j)
        row_text = tokenizer.decode(mixed.recall.row(j).input_ids[0])
        kinds.add("kv" if "has value" in document else "passkey")
        distances.append(distance_to_question(document, count))
        for key, value in re.findall(r"What value does key (\w+) have\? Key \w+ has value (\d+)\.", row_text):
            assert f"Key {key} has value {value}." in row_text.split("What value")[0]  # the fact precedes
        passkey = re.search(r"What is the pass key\? The pass key is (\d+)\.", row_text)
        if passkey:
            assert f"The pass key is {passkey.group(1)}. Remember it." in row_text
        assert "What value" in row_text or passkey, row_text[-300:]  # the question and answer fit the row
    assert kinds == {"kv", "passkey"}
    assert min(distances) < SEQ // 4 and max(distances) > SEQ // 2, distances


def test_deterministic_per_seed(rows, tokenizer):
    index = synthetic_indices(mix_recall_rows(rows, tokenizer, MIX, seed=0), 3)
    one = mix_recall_rows(rows, tokenizer, MIX, seed=0).batch(index)
    again = mix_recall_rows(rows, tokenizer, MIX, seed=0).batch(index)
    other = mix_recall_rows(rows, tokenizer, MIX, seed=1).batch(index)
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["input_ids"], other["input_ids"])


def test_resume_equals_straight_through_and_ranks_read_their_own_rows(rows, tokenizer):
    def loader(rank=0, world=1):
        # Rebuilt from scratch each time, as a resumed process would.
        return RowLoader(mix_recall_rows(rows, tokenizer, MIX, seed=0), batch_size=4, seed=0, rank=rank,
                         world_size=world)

    straight = loader()
    want = [straight.next_batch() for _ in range(6)]
    first = loader()
    for _ in range(3):
        first.next_batch()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for expected in want[3:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    user = {tuple(row.tolist()) for row in rows.input_ids}
    assert any(tuple(row.tolist()) not in user for b in want for row in b["input_ids"])  # some were synthetic
    rank0, rank1 = loader(0, 2).next_batch(), loader(1, 2).next_batch()
    assert not any(torch.equal(a, b) for a in rank0["input_ids"] for b in rank1["input_ids"])


def test_filler_is_the_users_text_without_recall_templates(tokenizer):
    paragraphs = ["The king is dead, long live the king.", "Key bada has value 1234.\nKey kiro has value 5678.",
                  "What is the pass key? The pass key is 44444.", "A second plain paragraph of prose here."] * 8
    filler = filler_from_rows(pack(tokenizer, paragraphs), tokenizer)
    text = "".join(filler.paras)
    assert "king is dead" in text and "prose" in text
    assert "has value" not in text and "pass key" not in text


def test_eval_items_stay_held_out(rows, tokenizer):
    """The eval's recall prompts (its own seeded streams, the held-out play as filler) share no fact with
    the training rows of the same seed, whose filler is the user's text."""
    mixed = mix_recall_rows(rows, tokenizer, MIX, seed=0)
    training = " ".join(mixed.recall.document(j) for j in range(24))
    eval_filler = Filler(DEFAULT_FILLER.read_text(), token_counter(tokenizer))
    facts = []
    for distance in (64, 256, 480):
        for sample in make_samples("kv", random.Random(f"0/kv/{distance}"), eval_filler, distance, 16):
            facts += re.findall(r"Key \w+ has value \d+\.", sample.prompt)
    assert facts and not [f for f in facts if f in training]
    user_text = (ROOT / "assets" / "corpus" / "hamlet.txt").read_text()
    assert all(p.strip() in user_text for p in mixed.recall.filler.paras)
