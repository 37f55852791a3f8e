"""lm-eval (EleutherAI's lm-evaluation-harness) on the teacher and on the exported hybrid.

The tasks in ``TASKS_DIR`` ship with the package, data included, and run with no network:
``hmf_kv_recall`` and ``hmf_passkey`` (greedy exact match, the embedded teacher's own recall formats),
``hmf_kv_choice`` (the same recall by loglikelihood over the four values in the prompt) and
``hmf_continuation`` (which line of held-out text comes next); the tag ``hmf`` names all four. lm-eval's
own tasks work too where their data is already in the Hugging Face cache: nothing is downloaded here.

From the command line, on an export (no code of ours needed):

    lm_eval --model hf --model_args pretrained=<export dir> --tasks hmf --include_path factory/eval/lm_eval_tasks

lm-eval is an optional dependency (``pip install -e '.[lmeval]'``), imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from factory.config.errors import ConfigError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
QWEN3_5_MODELING = "transformers.models.qwen3_5.modeling_qwen3_5"
_ABSENT = object()


@contextlib.contextmanager
def offline():
    """The hub and datasets in offline mode for the block. Both read their environment variables once,
    at import, and are imported long before eval, so their module-level switches are set as well."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(dict.fromkeys(saved_env, "1"))
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet():
    """lm-eval's warnings off for the block: it warns about what is chosen here on purpose (a loaded model
    passed in, the local tasks' own data loader)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_qwen3_5_for(device: str) -> None:
    """On CPU, import transformers' Qwen3.5 modeling with fla and causal_conv1d hidden: it binds fla's
    kernels at import whenever fla imports, even for CPU tensors, where they cannot run; hidden, its
    pure-torch GDN path is bound instead. A no-op on CUDA, or once the module is imported."""
    if not str(device).startswith("cpu") or QWEN3_5_MODELING in sys.modules:
        return
    saved = {name: sys.modules.get(name, _ABSENT) for name in ("fla", "causal_conv1d")}
    sys.modules.update(dict.fromkeys(saved))  # None in sys.modules: that import raises ImportError
    try:
        importlib.import_module(QWEN3_5_MODELING)
    finally:
        for name, module in saved.items():
            if module is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _local_tasks():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def task_manager(names: Iterable[str] = ()):
    """lm-eval's task index over ``TASKS_DIR``, with lm-eval's own tasks only when a name is not local:
    indexing those parses about 14,000 YAML files (25 s on a 2-core machine)."""
    from lm_eval.tasks import TaskManager

    local = _local_tasks()
    if all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=str(TASKS_DIR))


def _written_in_lm_eval(names: Iterable[str]) -> set[str]:
    """The names that occur in some file of lm-eval's task folder. Every name it indexes is written in
    one (a ``task``, ``group`` or ``tag`` value), so the others are unknown for sure, found by a text
    scan (about a second) before the full index is built."""
    import lm_eval.tasks

    wanted, found = {name.encode() for name in names}, set()
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*yaml"):
        text = path.read_bytes()
        found |= {name for name in wanted - found if name in text}
        if found == wanted:
            break
    return {name.decode() for name in found}


def _unknown(names: Sequence[str]) -> tuple[list[str], object]:
    """Names lm-eval knows neither here nor among its own tasks, and the task index that knows the rest."""
    manager = _local_tasks()
    missing = [name for name in names if name not in manager.all_tasks]
    written = _written_in_lm_eval(missing) if missing else set()
    unknown = [name for name in missing if name not in written]
    if missing and not unknown:
        manager = task_manager(missing)
        unknown = [name for name in missing if name not in manager.all_tasks]
    return unknown, manager


def check_tasks(names: Sequence[str], key: str = "eval.lm_eval_tasks") -> None:
    """Every name is a task, group or tag lm-eval knows, and each task builds offline (its data is
    local or cached). One ``ConfigError`` line otherwise."""
    if not names:
        return
    unknown, manager = _unknown(names)
    if unknown:
        local = sorted(_local_tasks().all_tasks)
        raise ConfigError(f"{key}: unknown lm-eval task(s) {', '.join(unknown)}; accepted: the local tasks "
                          f"{', '.join(local)} ({TASKS_DIR}) or any task `lm_eval ls tasks` lists")
    with offline(), quiet():
        for name in names:
            try:
                manager.load([name])
            except Exception as err:  # lm-eval and datasets raise many kinds; the first line says which
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"{key}: lm-eval task {name} cannot be loaded offline ({first}); accepted: "
                                  "tasks whose data is local or already in the Hugging Face cache") from None


def scores(results: dict) -> dict:
    """``{task: {"samples": n, "metrics": {"acc,none": x, ...}}}`` from simple_evaluate's output:
    every number but the standard errors (lm-eval keys metrics as ``<metric>,<filter>``)."""
    out = {}
    for task, row in results["results"].items():
        metrics = {k: float(v) for k, v in row.items()
                   if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        out[task] = {"samples": samples, "metrics": metrics}
    return out


def run_tasks(model, tokenizer, names: Sequence[str], limit: int | None, batch_size: int) -> dict:
    """``scores`` of one loaded model on the named tasks (offline; lm-eval's fixed seeds)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with offline():
            results = simple_evaluate(model=lm, tasks=list(names), limit=limit, task_manager=task_manager(names),
                                      bootstrap_iters=0, log_samples=False)
    return scores(results)


def compare(teacher: dict, hybrid: dict) -> dict:
    """``{task: {"samples": n, "metrics": {metric: {"teacher", "hybrid", "kept"}}}}`` from two ``scores``;
    ``kept`` is the hybrid's share of the teacher's score (None where the teacher scores 0)."""
    out = {}
    for task, row in teacher.items():
        theirs = hybrid[task]["metrics"]
        out[task] = {"samples": row["samples"],
                     "metrics": {m: {"teacher": t, "hybrid": theirs[m], "kept": theirs[m] / t if t else None}
                                 for m, t in row["metrics"].items()}}
    return out
