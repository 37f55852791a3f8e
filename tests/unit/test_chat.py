"""Chat data: assistant-only labels, whole conversations per row, clear errors."""

import json

import pytest

from factory.data.chat import ChatDataError, pack_conversations, read_conversations, tokenize_conversation
from factory.data.packing import IGNORE_INDEX
from tests.fixtures import make_tiny_assets


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    assets = make_tiny_assets(tmp_path_factory.mktemp("chat"))
    return AutoTokenizer.from_pretrained(assets["teacher"])


def conversation(answer="It is 7."):
    return [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": answer}]


def test_only_assistant_tokens_are_trained(tokenizer):
    ids, trained = tokenize_conversation(tokenizer, conversation())
    text = tokenizer.decode([i for i, t in zip(ids, trained) if t])
    assert "It is 7." in text and "3 plus 4" not in text
    rows, stats = pack_conversations(tokenizer, [conversation()], seq_len=64)
    labels = rows.labels[0]
    trained_targets = tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert "It is 7." in trained_targets and "plus" not in trained_targets


def test_conversations_are_packed_whole_with_restarting_positions(tokenizer):
    convs = [conversation(f"It is {i}.") for i in range(6)]
    n = len(tokenize_conversation(tokenizer, convs[0])[0])
    rows, stats = pack_conversations(tokenizer, convs, seq_len=2 * n + 1)
    assert stats.rows == 3 and stats.truncated == stats.dropped == 0
    starts = (rows.position_ids == 0).nonzero().tolist()
    assert [0, 0] in starts and [0, n] in starts  # the second conversation restarts at position 0


def test_overflow_truncates_or_drops_and_counts(tokenizer):
    long = conversation("word " * 200)
    row = len(tokenize_conversation(tokenizer, conversation())[0]) + 2
    _, truncated = pack_conversations(tokenizer, [long, conversation()], seq_len=row, overflow="truncate")
    assert truncated.truncated == 1 and truncated.dropped == 0
    _, dropped = pack_conversations(tokenizer, [long, conversation()], seq_len=row, overflow="drop")
    assert dropped.dropped == 1 and dropped.rows == 1
    with pytest.raises(ChatDataError, match="overflow"):
        pack_conversations(tokenizer, [long], seq_len=row, overflow="wrap")


def test_unknown_role_and_missing_template_are_clear(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(ChatDataError, match="role 'robot'.*accepted"):
        read_conversations([str(bad)])
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ChatDataError, match="no chat template"):
            tokenize_conversation(tokenizer, conversation())
    finally:
        tokenizer.chat_template = template
