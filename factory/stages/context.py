"""What a stage function receives: the typed config, its own directory and its parent's."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factory.config.schema import PrimeConfig
from factory.distributed.engine import forward_only, gathered_parameters, zero3_loading
from factory.distributed.env import DistEnv
from factory.models.hqwen3 import HQwen3ForCausalLM
from factory.rundir import model_dir, read_stage

# Which ranks run a stage: all (training), zero3 (every rank under ZeRO-3, where no rank may hold
# the whole model; rank 0 otherwise), main (rank 0 alone).
RANKS = ("all", "zero3", "main")


def hqwen3_source(stage_dir: Path) -> Path:
    """The HQwen3 model directory of a stage. A Qwen3.5-format export holds the same function in
    stock classes (equal fp32 logits, tested), so later stages read the model it was written from."""
    path = model_dir(stage_dir)
    config = path / "config.json"
    if config.exists() and json.loads(config.read_text()).get("model_type") == "qwen3_5_text":
        return hqwen3_source(Path(read_stage(stage_dir)["parent"]))
    return path


@dataclass
class StageContext:
    cfg: PrimeConfig
    name: str
    stage_dir: Path
    parent_dir: Path | None
    device: torch.device
    precision: str  # fp32 | bf16
    stage_hash: str = ""
    env: DistEnv = DistEnv()
    ranks: str = "main"  # the stage's ``Stage.ranks``

    @property
    def collective(self) -> bool:
        """Training stages run on every rank, and so do init and eval under ZeRO-3; the others on rank 0 alone."""
        return self.ranks == "all" or (self.ranks == "zero3" and self._zero3_configured)

    @property
    def _zero3_configured(self) -> bool:
        return self.cfg.deepspeed.enabled and self.cfg.deepspeed.zero_stage == 3

    @property
    def zero3(self) -> bool:
        # Sharded loading is collective, so only stages that every rank runs use it.
        return self._zero3_configured and self.collective

    def gathered(self, params):
        """Whole tensors of ZeRO-3 sharded parameters for the duration of the block (read only)."""
        if not self.zero3:
            return contextlib.nullcontext()
        return gathered_parameters(params)

    def forward_only(self, model):
        """``model`` ready for forward passes for the block: as it is, or under ZeRO-3 in a forward-only
        engine (whose hooks gather one layer at a time), released on exit."""
        if not self.zero3:
            return contextlib.nullcontext(model)
        return forward_only(model, self.cfg.deepspeed, self.precision)

    def sharded_loading(self):
        if not self.zero3:
            return contextlib.nullcontext()
        return zero3_loading(self.cfg.deepspeed, self.precision)

    @property
    def parent_model_dir(self) -> Path:
        if self.parent_dir is None or not model_dir(self.parent_dir).exists():
            raise RuntimeError(f"stage '{self.name}' needs a model from the previous stage, found none in "
                               f"{self.parent_dir}")
        return hqwen3_source(self.parent_dir)

    @property
    def out_model_dir(self) -> Path:
        return model_dir(self.stage_dir)

    @cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.cfg.model.path)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.stage_dir.parent / ".cache"

    def load_teacher(self, dtype: torch.dtype = torch.float32):
        """The original model, frozen."""
        with self.sharded_loading():
            model = AutoModelForCausalLM.from_pretrained(
                self.cfg.model.path, dtype=dtype, attn_implementation=self.cfg.model.attn_implementation)
        return model.to(self.device).eval().requires_grad_(False)

    def load_hybrid(self, path: Path | None = None, **config):
        """The hybrid at ``path`` (default: the parent's model); ``config`` overrides its config
        (weights the checkpoint lacks are then left for the caller to fill)."""
        with self.sharded_loading():
            model = HQwen3ForCausalLM.from_pretrained(
                path or self.parent_model_dir, dtype=torch.float32,
                attn_implementation=self.cfg.model.attn_implementation, **config)
        return model.to(self.device)

    def modifying(self, params):
        """Whole tensors of ``params`` for the block, written on rank 0: under ZeRO-3 its values are
        broadcast into every rank's shards on exit."""
        if not self.zero3:
            return contextlib.nullcontext()
        return gathered_parameters(params, modifier_rank=0)
