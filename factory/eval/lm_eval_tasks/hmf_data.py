"""The data of this folder's lm-eval tasks, read from the JSONL shipped beside it (``data/``), so lm-eval
asks neither the hub nor the datasets cache (``datasets.load_dataset("json", ...)`` would resolve the
path against the working directory). A task's YAML names its file in ``dataset_kwargs``.

This folder is lm-eval's ``--include_path``; nothing here imports ``factory``, so the tasks run
wherever lm-eval and the export do. ``assets/build_lm_eval_tasks.py`` writes the data.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load(file: str, **metadata) -> datasets.DatasetDict:
    """The one split ``test``; ``metadata`` is the task's (lm-eval passes it along) and unused."""
    lines = (DATA / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
