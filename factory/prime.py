"""``python -m factory.prime +recipe=gdn_50pct [model=qwen3_32b] [key=value ...]``

Compose the config (Hydra), validate it and its inputs before anything is written, then
hand the typed config to the pipeline. Bad input: one ``error: ...`` line, exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from factory.config import (CONFIG_DIR, ConfigError, check_recipe_overrides, register_configs,
                            register_resolvers, resolved_yaml, to_typed)
from factory.checkpoint.state import ResumeRefused
from factory.config.validate import check_pipeline_dir, validate_inputs, validate_static
from factory.pipeline import run_pipeline
from factory.train.checkpointing import Preempted

EXIT_BAD_INPUT = 2


def _fail(err: ConfigError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(config_path=str(CONFIG_DIR), config_name="prime", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    try:
        typed = to_typed(cfg)
        validate_static(typed)
        validate_inputs(typed)
        check_pipeline_dir(typed)
        run_pipeline(typed, resolved_yaml(cfg))
    except (ConfigError, ResumeRefused) as err:
        _fail(err)
    except Preempted as stop:
        # Checkpoint written; the launcher (SLURM requeue) restarts and the run resumes.
        print(f"preempted: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)


def _resolve_printed_config(argv: list[str]) -> list[str]:
    """``--cfg`` shows the config as it will run: paths and output_dir resolved."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        return [*argv, "--resolve"]
    return argv


def main() -> None:
    # Before Hydra: its own error for an unknown group option spans several lines.
    try:
        check_recipe_overrides(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    sys.argv[1:] = _resolve_printed_config(sys.argv[1:])
    register_resolvers()
    register_configs()
    _run()


if __name__ == "__main__":
    main()
