"""The one list of stages, in pipeline order. The pipeline, the config validation (through
``factory.config.schema.STAGES``, kept equal to this by a test) and the run directory read it."""

from __future__ import annotations

from factory.stages import align, distill, export, init, longctx, select, sft
from factory.stages import eval as eval_stage
from factory.stages.base import Stage

STAGES: tuple[Stage, ...] = (select.STAGE, init.STAGE, align.STAGE, distill.STAGE, longctx.STAGE, sft.STAGE,
                             export.STAGE, eval_stage.STAGE)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
