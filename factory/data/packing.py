"""Text datasets -> packed token rows with document boundaries.

Documents are tokenized (``datasets``), each followed by EOS, concatenated and cut into rows of
``seq_len``. ``position_ids`` restart at every document start, which is how both mixers learn
the boundaries (attention builds a block-causal mask, GDN derives ``cu_seqlens``). Labels at
a position whose next token starts a new document are ignored (-100). Packed rows are cached
on disk, keyed by the files, tokenizer and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
_LOADERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [N, T] int64
    position_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T], next token or IGNORE_INDEX

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "position_ids": self.position_ids[index],
                "labels": self.labels[index]}


def model_inputs(batch: dict, device=None) -> dict:
    """The forward arguments of a packed batch (labels stay with the loss)."""
    return {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
            "use_cache": False}


def load_texts(files: list[str], text_field: str, num_proc: int = 1):
    """A ``datasets.Dataset`` with one column, ``text``, from local jsonl/json/txt/parquet/csv files."""
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for file in files:
        suffix = Path(file).suffix
        if suffix not in _LOADERS:
            raise ValueError(f"data file '{file}' has unsupported type '{suffix}'; accepted: {sorted(_LOADERS)}")
        ds = load_dataset(_LOADERS[suffix], data_files=str(file), split="train")
        field = "text" if suffix == ".txt" else text_field
        parts.append(ds.select_columns([field]).rename_column(field, "text") if field != "text" else
                     ds.select_columns(["text"]))
    return concatenate_datasets(parts)


def _cache_key(files: list[str], tokenizer, seq_len: int, text_field: str) -> str:
    h = hashlib.sha256()
    for file in files:
        stat = Path(file).stat()
        h.update(f"{Path(file).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    h.update(json.dumps([len(tokenizer), tokenizer.eos_token_id, seq_len, text_field,
                         getattr(tokenizer, "name_or_path", "")]).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    return h.hexdigest()[:20]


def pack_token_lists(docs: list[list[int]], eos_id: int, seq_len: int) -> PackedRows:
    ids, starts = [], []
    for doc in docs:
        ids.extend(doc)
        ids.append(eos_id)
        starts.extend([True] + [False] * len(doc))
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the dataset holds {len(ids)} tokens, fewer than one row of seq_len={seq_len}")
    input_ids = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    doc_start = torch.tensor(starts[: n * seq_len]).view(n, seq_len)
    # A row cut mid-document is its own context: positions restart at row starts too.
    context_start = doc_start.clone()
    context_start[:, 0] = True
    idx = torch.arange(seq_len).expand(n, seq_len)
    position_ids = idx - torch.where(context_start, idx, 0).cummax(dim=1).values
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(doc_start[:, 1:], IGNORE_INDEX, input_ids[:, 1:])
    return PackedRows(input_ids, position_ids, labels)


def packed_rows(files: list[str], tokenizer, seq_len: int, text_field: str = "text",
                cache_dir: str | Path | None = None, num_proc: int = 1) -> PackedRows:
    """Tokenize and pack ``files``; reuse the on-disk cache when nothing changed."""
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"packed-{_cache_key(files, tokenizer, seq_len, text_field)}.pt"
        if cache.exists():
            return PackedRows(**torch.load(cache))
    texts = load_texts(files, text_field, num_proc)
    tokenized = texts.map(lambda b: {"ids": tokenizer(b["text"], add_special_tokens=False)["input_ids"]},
                          batched=True, remove_columns=["text"], num_proc=num_proc if num_proc > 1 else None,
                          load_from_cache_file=False)
    rows = pack_token_lists([d for d in tokenized["ids"] if d], tokenizer.eos_token_id, seq_len)
    # Rank 0 alone writes the shared cache: every rank packs the same rows, and a run directory's
    # files have one writer (tests/launch checks it on two nodes).
    if cache is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save(rows.__dict__, tmp)
        tmp.replace(cache)
    return rows
