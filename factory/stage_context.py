"""What a stage function receives: the typed config, its own directory and its parent's."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from factory.config.schema import PrimeConfig
from factory.rundir import model_dir


@dataclass
class StageContext:
    cfg: PrimeConfig
    name: str
    stage_dir: Path
    parent_dir: Path | None
    device: torch.device
    precision: str  # fp32 | bf16
    stage_hash: str = ""

    @property
    def parent_model_dir(self) -> Path:
        if self.parent_dir is None or not model_dir(self.parent_dir).exists():
            raise RuntimeError(f"stage '{self.name}' needs a model from the previous stage, found none in "
                               f"{self.parent_dir}")
        return model_dir(self.parent_dir)

    @property
    def out_model_dir(self) -> Path:
        return model_dir(self.stage_dir)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.cfg.model.path)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.stage_dir.parent / ".cache"

    def load_teacher(self):
        """The original model, frozen (hybrid code path with every layer attention: identical logits)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            self.cfg.model.path, dtype=torch.float32, attn_implementation=self.cfg.model.attn_implementation)
        return model.to(self.device).eval().requires_grad_(False)

    def load_hybrid(self, path: Path | None = None):
        from factory.models.hqwen3 import HQwen3ForCausalLM

        model = HQwen3ForCausalLM.from_pretrained(
            path or self.parent_model_dir, dtype=torch.float32,
            attn_implementation=self.cfg.model.attn_implementation)
        return model.to(self.device)
