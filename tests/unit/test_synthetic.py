"""Synthetic retrieval generators, the retrieval eval, and the shipped teacher assets."""

import json
import random
from pathlib import Path

import pytest
import torch

from factory.data import synthetic as syn
from factory.eval.retrieval import DEFAULT_FILLER, retrieval_accuracy, score_samples

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ROOT / "assets" / "teacher"
DATA = ROOT / "assets" / "data"

pytestmark = pytest.mark.skipif(not (TEACHER / "tokenizer.json").exists(),
                                reason="embedded teacher not built (see assets/build_teacher.py)")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEACHER)


@pytest.fixture(scope="module")
def filler(tokenizer):
    return syn.Filler(DEFAULT_FILLER.read_text(), syn.token_counter(tokenizer))


class Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token (shift=1); shift=0 is off by one."""

    def __init__(self, vocab: int, shift: int = 1):
        super().__init__()
        self.vocab, self.shift = vocab, shift

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, self.vocab).float()})


@pytest.mark.parametrize("task", ["kv", "passkey"])
def test_same_seed_same_samples(task, filler):
    a = syn.make_samples(task, random.Random(7), filler, 100, 4)
    b = syn.make_samples(task, random.Random(7), filler, 100, 4)
    c = syn.make_samples(task, random.Random(8), filler, 100, 4)
    assert a == b and a != c


@pytest.mark.parametrize("task", ["kv", "passkey"])
@pytest.mark.parametrize("distance", [16, 64, 480, 2048])
def test_fact_sits_at_requested_token_distance(task, distance, filler, tokenizer):
    count = syn.token_counter(tokenizer)
    for s in syn.make_samples(task, random.Random(distance), filler, distance, 5):
        measured = count(s.prompt[: s.question_start]) - count(s.prompt[: s.fact_end])
        # Filler is cut at word boundaries, so it may fall a few tokens short, never long.
        assert distance - 12 <= measured <= distance + 2, (task, distance, measured)
        assert s.answer.strip() in s.prompt[: s.fact_end]
        assert s.answer.strip().isdigit() and s.answer.startswith(" ")


def test_training_documents_hold_their_answers(filler, tokenizer):
    docs = syn.training_documents(random.Random(0), filler, 40, length=512,
                                  mix=(0.0, 0.4, 0.4, 0.2))
    for doc in docs:
        assert len(tokenizer(doc)["input_ids"]) >= 512
        head = tokenizer.decode(tokenizer(doc)["input_ids"][:512])
        if "pass key" in head:
            key = head.split("The pass key is ")[1][:5]
            assert f"{syn.PASSKEY_QUESTION} {key}." in head
        elif "has value" in head:
            question = head.split("What value does key ")[1]
            key = question.split(" ")[0]
            value = head.split(f"Key {key} has value ")[1][:4]
            assert head.count(f"Key {key} has value {value}.") == 2
        else:
            assert head.count("Again, the List:") == 1


def test_oracle_scores_one_and_off_by_one_scores_zero(tokenizer):
    acc = retrieval_accuracy(Oracle(len(tokenizer)), tokenizer, [32, 300], 6, seed=0)
    assert acc == {"kv": {32: 1.0, 300: 1.0}, "passkey": {32: 1.0, 300: 1.0}}
    acc = retrieval_accuracy(Oracle(len(tokenizer), shift=0), tokenizer, [32], 6, seed=0)
    assert acc == {"kv": {32: 0.0}, "passkey": {32: 0.0}}


def test_batching_does_not_change_scores(tokenizer, filler):
    samples = syn.make_samples("kv", random.Random(3), filler, 64, 5)
    oracle = Oracle(len(tokenizer))
    assert score_samples(oracle, tokenizer, samples) == score_samples(
        oracle, tokenizer, samples, max_batch_tokens=1)


def test_bad_task_is_one_clear_error(tokenizer):
    with pytest.raises(ValueError, match="tasks="):
        retrieval_accuracy(Oracle(len(tokenizer)), tokenizer, [32], 2, seed=0, tasks=("nope",))


def test_shipped_teacher_loads_and_matches_tokenizer(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    assert model.config.model_type == "qwen3"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_shipped_teacher_retrieves_at_its_training_length(tokenizer):
    """The embedded teacher answers key-value recall and passkey from far back inside its training
    length (512), or no test could see what priming loses (assets/README.md has the full table)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    acc = retrieval_accuracy(model, tokenizer, [64, 352], 16, seed=5)
    assert min(acc["kv"].values()) >= 0.8 and min(acc["passkey"].values()) >= 0.95, acc


def test_shipped_datasets_are_disjoint_and_well_formed():
    rows = {name: [json.loads(x) for x in (DATA / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout", "chat", "chat_heldout")}
    train, heldout = {r["text"] for r in rows["train"]}, {r["text"] for r in rows["heldout"]}
    assert train and heldout and not train & heldout
    for conv in rows["chat"] + rows["chat_heldout"]:
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["user", "assistant"] and all(m["content"] for m in conv["messages"])
    assert len(rows["chat"]) > 5 * len(rows["chat_heldout"]) > 0
