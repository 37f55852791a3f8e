"""Chat data for instruction tuning: JSONL of ``{"messages": [{"role", "content"}, ...]}``.

Conversations are rendered with the tokenizer's chat template. A token is trained on when it
belongs to an assistant message (found by rendering growing prefixes of the conversation, so any
prefix-stable template works). Conversations are packed whole into rows, positions restarting at
each, so no conversation sees another; one longer than a row is truncated or dropped, as
configured, and counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from factory.data.packing import IGNORE_INDEX, PackedRows

ROLES = ("system", "user", "assistant")
OVERFLOW = ("truncate", "drop")


class ChatDataError(ValueError):
    """Bad chat data or tokenizer, with a one-line message."""


@dataclass
class PackStats:
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0
    rows: int = 0


def read_conversations(files: list[str]) -> list[list[dict]]:
    conversations = []
    for file in files:
        for number, line in enumerate(Path(file).read_text().splitlines(), 1):
            if line.strip():
                conversations.append(_messages(line, f"{file}:{number}"))
    if not conversations:
        raise ChatDataError(f"no conversations in {files}")
    return conversations


def _messages(line: str, where: str) -> list[dict]:
    """One JSONL line's ``messages``: a non-empty list of {role, content} with known roles."""
    shape = 'accepted: {"messages": [{"role": "user", "content": "..."}, ...]}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ChatDataError(f"{where} is not JSON ({err.msg}); {shape}") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not messages or not isinstance(messages, list):
        raise ChatDataError(f"{where} has no 'messages' list (got {type(messages).__name__}); {shape}")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatDataError(f"{where}: message {str(message)[:60]!r} is not a {{role, content}} object; {shape}")
        if message.get("role") not in ROLES:
            raise ChatDataError(f"{where} has role {message.get('role')!r}; accepted: {ROLES}")
    return messages


def _render(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it is assistant text to learn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatDataError(f"tokenizer '{tokenizer.name_or_path}' has no chat template; sft needs one")
    ids, trained = [], []
    for i, message in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1])
        if full[: len(ids)] != ids:
            raise ChatDataError("the chat template is not prefix-stable; cannot locate assistant tokens")
        new = full[len(ids):]
        ids.extend(new)
        trained.extend([message["role"] == "assistant"] * len(new))
    return ids, trained


def _fit(ids, trained, seq_len: int, overflow: str, stats: PackStats):
    if len(ids) <= seq_len:
        return ids, trained
    if overflow == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    return ids[:seq_len], trained[:seq_len]


def pack_conversations(tokenizer, conversations: list[list[dict]], seq_len: int,
                       overflow: str = "truncate") -> tuple[PackedRows, PackStats]:
    """Whole conversations per row, first-fit in order; the rest of a row is padding."""
    if overflow not in OVERFLOW:
        raise ChatDataError(f"sft overflow '{overflow}' is not one of {OVERFLOW}")
    stats = PackStats(conversations=len(conversations))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, row = [], []
    for messages in conversations:
        fitted = _fit(*tokenize_conversation(tokenizer, messages), seq_len, overflow, stats)
        if fitted is None:
            continue
        if sum(len(c[0]) for c in row) + len(fitted[0]) > seq_len:
            rows.append(row)
            row = []
        row.append(fitted)
    if row:
        rows.append(row)
    if not rows:
        raise ChatDataError(f"every conversation is longer than seq_len={seq_len} and overflow=drop")
    stats.rows = len(rows)
    return _rows_to_tensors(rows, seq_len, pad), stats


def _rows_to_tensors(rows, seq_len: int, pad: int) -> PackedRows:
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for r, row in enumerate(rows):
        start = 0
        for ids, trained in row:
            n = len(ids)
            input_ids[r, start:start + n] = torch.tensor(ids)
            position_ids[r, start:start + n] = torch.arange(n)
            for t in range(n - 1):
                if trained[t + 1]:
                    labels[r, start + t] = ids[t + 1]
            start += n
        position_ids[r, start:] = torch.arange(seq_len - start)
    return PackedRows(input_ids, position_ids, labels)
