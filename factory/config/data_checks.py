"""Data checks before anything runs: each text data set holds enough tokens for what the stages
that will run read from it, and every row length fits the model's positions.

Counting is cheap: records are tokenized only until the needed number of tokens is reached.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from factory.config.errors import ConfigError
from factory.config.schema import PrimeConfig

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")
SCORING = ("swa_proxy", "gdn_proxy", "kl_trained", "kl_restore")


@dataclass
class Need:
    key: str  # the config field naming the files
    tokens: int
    why: str  # who reads them, and how much
    fix: str  # the settings that lower the need


def _rows(stage: str, seq_len: int, rows: int, fix: str) -> tuple[int, str, str]:
    return seq_len * rows, f"{stage} needs {rows} row(s) of {seq_len} tokens", fix


def data_needs(cfg: PrimeConfig, data_parallel: int) -> list[Need]:
    """What each data set must hold for the stages in ``cfg.stages``."""
    found: list[Need] = []

    def need(key, tokens, why, fix):
        found.append(Need(key, tokens, why, fix))

    for stage in ("align", "distill"):
        if stage in cfg.stages:
            s = getattr(cfg, stage)
            need("data.train_files", *_rows(stage, s.seq_len or cfg.data.seq_len, s.batch_size * data_parallel,
                                            f"{stage}.batch_size or {stage}.seq_len / data.seq_len"))
    if "longctx" in cfg.stages:
        lc = cfg.longctx
        rows = lc.batch_size * max(1, data_parallel // lc.sp_degree)
        need("longctx.data_files", *_rows("longctx", lc.seq_len or cfg.data.seq_len, rows,
                                          "longctx.batch_size or longctx.seq_len"))
    if "eval" in cfg.stages:
        need("data.heldout_files", *_rows("eval", cfg.data.seq_len, 1, "data.seq_len"))
    _select_needs(cfg, need)
    return found


def _select_needs(cfg: PrimeConfig, need) -> None:
    sel = cfg.select
    if "select" not in cfg.stages or sel.method not in SCORING:
        return
    seq_len = sel.calibration_seq_len or cfg.data.seq_len
    if sel.calibration_rows > 0 and sel.answer_weight < 1:
        key = "select.calibration_files" if _calibration_text(cfg) else "data.heldout_files"
        need(key, *_rows("select", seq_len, 1, "select.calibration_seq_len"))
    if sel.method in ("kl_trained", "kl_restore"):
        need("data.train_files", *_rows("select", seq_len, sel.trained_batch_size,
                                        "select.trained_batch_size or select.calibration_seq_len"))


def _calibration_text(cfg: PrimeConfig) -> list[str]:
    """The text files among select.calibration_files (the others hold recall items, scored on answers)."""
    from factory.data.recall_items import split_calibration_files

    return split_calibration_files(cfg.select.calibration_files)[0]


def files_of(cfg: PrimeConfig, key: str) -> list[str]:
    if key == "select.calibration_files":
        return _calibration_text(cfg)
    section, name = key.split(".")
    return list(getattr(getattr(cfg, section), name) or [])


def check_data_lengths(cfg: PrimeConfig, tokenizer, data_parallel: int = 1) -> None:
    """The largest need of each data set, counted once per data set."""
    largest: dict[str, Need] = {}
    for item in data_needs(cfg, data_parallel):
        if item.key not in largest or item.tokens > largest[item.key].tokens:
            largest[item.key] = item
    for key, item in largest.items():
        files = files_of(cfg, key)
        have = count_tokens(files, tokenizer, cfg.data.text_field, item.tokens)
        if have < item.tokens:
            raise ConfigError(f"{key} holds {have:,} tokens, fewer than the {item.tokens:,} that {item.why}; "
                              f"accepted: more data in {', '.join(files)}, or a lower {item.fix}")


def count_tokens(files: list[str], tokenizer, text_field: str, enough: int) -> int:
    """Tokens as packing counts them (each non-empty document plus its EOS), up to ``enough``."""
    total = 0
    for name in files:
        for text in iter_texts(Path(name), text_field):
            n = _tokens_up_to(tokenizer, text, enough - total)
            total += n + 1 if n else 0
            if total >= enough:
                return total
    return total


def _tokens_up_to(tokenizer, text: str, wanted: int) -> int:
    """Tokens of ``text``, or at least ``wanted`` of them: a long document is cut to a prefix first."""
    chars = max(256, 8 * wanted)
    while True:
        n = len(tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"])
        if n >= wanted or chars >= len(text):
            return n
        chars *= 4


def iter_texts(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix
    if suffix not in TEXT_SUFFIXES:
        raise ConfigError(f"data file '{path}' has unsupported type '{suffix}'; accepted: {', '.join(TEXT_SUFFIXES)}")
    if suffix == ".parquet":
        yield from _parquet_texts(path, text_field)
        return
    with path.open(encoding="utf-8", newline="") as handle:
        if suffix == ".txt":
            yield from (line for line in handle if line.strip())
        elif suffix == ".csv":
            yield from (row.get(text_field) or "" for row in csv.DictReader(handle))
        else:
            yield from _json_lines(path, handle, text_field)


def _json_lines(path: Path, handle, text_field: str) -> Iterator[str]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"data file '{path}' line {number} is not JSON; accepted: JSONL of "
                              f"{{\"{text_field}\": ...}} lines") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield text


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=[text_field]):
        yield from (t or "" for t in batch.column(0).to_pylist())


def check_positions(cfg: PrimeConfig, model_positions: int) -> None:
    """Every row a stage feeds the model fits its positions (longctx raises them for the stages after it)."""
    extended = cfg.longctx.max_position_embeddings if "longctx" in cfg.stages else model_positions
    rows = []
    if "select" in cfg.stages and cfg.select.method in SCORING:
        own = cfg.select.calibration_seq_len
        rows.append(("select.calibration_seq_len" if own else "data.seq_len", own or cfg.data.seq_len, model_positions))
    for stage in ("align", "distill", "sft"):
        if stage in cfg.stages:
            own = getattr(cfg, stage).seq_len
            rows.append((f"{stage}.seq_len" if own else "data.seq_len", own or cfg.data.seq_len,
                         extended if stage == "sft" else model_positions))
    if "eval" in cfg.stages:
        rows.append(("data.seq_len", cfg.data.seq_len, extended))
        rows.append(("eval.retrieval_distances", max(cfg.eval.retrieval_distances), extended - 1))
    for key, length, limit in rows:
        if length > limit:
            raise ConfigError(f"{key}: {length:,} tokens is beyond the model's {limit:,} positions "
                              f"(max_position_embeddings); accepted: at most {limit:,}, or run longctx first "
                              "to extend the positions")
