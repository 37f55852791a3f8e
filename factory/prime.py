"""``python -m factory.prime +recipe=gdn_50pct [model=qwen3_32b] [key=value ...]``

Compose the config (Hydra), validate it and its inputs before anything is written, then
hand the typed config to the pipeline. Bad input: one ``error: ...`` line, exit code 2.
An unexpected failure: one line naming the log file that holds the traceback, exit code 1.
SIGTERM / SIGUSR1 / SIGINT in a training stage: a checkpoint, one line, exit code 128 + signal.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from factory.config import (CONFIG_DIR, ConfigError, check_recipe_overrides, register_configs,
                            register_resolvers, resolved_yaml, to_typed)
from factory.checkpoint.state import ResumeRefused
from factory.config.validate import validate
from factory.pipeline import run_pipeline
from factory.train.checkpointing import Preempted

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
# Hydra options that change what runs (help, sweeps, another config): left to Hydra unchecked.
_HYDRA_ONLY = ("--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--config-path", "-cp",
               "--config-name", "-cn", "--config-dir", "-cd", "--shell-completion", "-sc", "--experimental-rerun")


def _fail(err: ConfigError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _crash_log(output_dir: Optional[str]) -> Path:
    """``<output_dir>/logs/error-<time>.log`` once the run directory exists; a temporary file before."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rank = os.environ.get("RANK")
    name = f"error-{stamp}{f'-rank{rank}' if rank and os.environ.get('WORLD_SIZE', '1') != '1' else ''}.log"
    if output_dir and Path(output_dir).is_dir():
        path = Path(output_dir) / "logs" / name
        path.parent.mkdir(exist_ok=True)
    else:
        path = Path(tempfile.gettempdir()) / f"factory-{name}"
    path.write_text(traceback.format_exc())
    return path


def _crashed(err: Exception, output_dir: Optional[str]) -> None:
    message = " ".join(str(err).split()) or "(no message)"
    print(f"error: {type(err).__name__}: {message} (traceback in {_crash_log(output_dir)})", file=sys.stderr)
    sys.exit(EXIT_FAILED)


def run(cfg: DictConfig) -> None:
    """Everything after composition: validate, run, and turn every way of stopping into one line."""
    typed = None
    try:
        typed = to_typed(cfg)
        validate(typed)
        run_pipeline(typed, resolved_yaml(cfg))
    except (ConfigError, ResumeRefused) as err:
        _fail(err)
    except Preempted as stop:
        # Checkpoint written; the launcher (SLURM requeue) restarts and the run resumes.
        print(f"{'interrupted' if stop.signum == signal.SIGINT else 'preempted'}: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        print("interrupted: complete stages are kept (an interrupted stage resumes from its last checkpoint, "
              "if any); rerun the same command to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, the traceback in a file
        _crashed(err, typed.output_dir if typed else None)


_run = hydra.main(config_path=str(CONFIG_DIR), config_name="prime", version_base="1.3")(run)


def _resolve_printed_config(argv: list[str]) -> list[str]:
    """``--cfg`` shows the config as it will run: paths and output_dir resolved."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        return [*argv, "--resolve"]
    return argv


def _overrides(argv: list[str]) -> Optional[list[str]]:
    """The key=value overrides of a plain run; None when Hydra options make it something else."""
    if any(a.split("=")[0] in _HYDRA_ONLY for a in argv):
        return None
    out, skip = [], False
    for arg in argv:
        if skip or arg in ("--resolve",):
            skip = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p"):
            skip = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            out.append(arg)
    return out


def precheck(argv: list[str]) -> None:
    """Compose once before Hydra's app runs: its own errors span several lines."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from factory.config import compose
    from factory.config.overrides import composition_error

    check_recipe_overrides(argv)
    overrides = _overrides(argv)
    if overrides is None:
        return
    try:
        compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from None


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        precheck(argv)
    except ConfigError as err:
        _fail(err)
    sys.argv[1:] = _resolve_printed_config(argv)
    register_resolvers()
    register_configs()
    _run()


if __name__ == "__main__":
    main()
