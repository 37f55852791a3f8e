"""The study's arms (issue 4) and their typed configs.

Every arm is one full pipeline (select -> init -> align -> distill -> export -> eval) from a
``recipes/gdn_<ratio>pct.yaml`` recipe plus overrides; arms differ only in what they study, and
all use the same align/distill steps and batch (equal training tokens per arm).

Groups:
- ``selection``: alternate, swa_proxy, gdn_proxy, kl_trained at 25/50/75% GDN;
- ``variant``: at 50% with ``VARIANT_BASE`` selection, one change each: random gate,
  q/k-norm kept as scale, identity conv, pure next-token loss in stage 2, pre_lm_head alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RATIOS = (0.25, 0.5, 0.75)
METHODS = ("alternate", "swa_proxy", "gdn_proxy", "kl_trained")
VARIANT_BASE = "swa_proxy"
VARIANTS = {
    "gate_random": ["init.gate_init=random"],
    "qk_norm_scale": ["init.qk_norm=scale"],
    "conv_identity": ["init.conv_init=identity"],
    "stage2_ce_only": ["distill.ce_weight=1.0"],
    "align_pre_lm_head": ["align.loss=pre_lm_head"],
}
DISTANCES = (32, 128, 256, 480, 1024, 2048)  # window 64: 32 within; 128..480 beyond; 2x and 4x of 512


@dataclass
class Arm:
    name: str
    group: str  # selection | variant
    method: str
    ratio: float
    seed: int
    variant: str = "default"
    overrides: list[str] = field(default_factory=list)

    def recipe(self) -> str:
        return f"gdn_{round(self.ratio * 100)}pct"


def selection_arms(seeds, ratios=RATIOS, methods=METHODS) -> list[Arm]:
    return [Arm(f"sel-{m}-r{round(r * 100)}-s{s}", "selection", m, r, s)
            for r in ratios for m in methods for s in seeds]


def variant_arms(seeds, variants=tuple(VARIANTS)) -> list[Arm]:
    return [Arm(f"var-{v}-r50-s{s}", "variant", VARIANT_BASE, 0.5, s, v, list(VARIANTS[v]))
            for v in variants for s in seeds]


@dataclass
class Budget:
    """Study-wide settings that every arm shares."""

    align_steps: int = 150
    distill_steps: int = 300
    batch_size: int = 8
    retrieval_samples: int = 64
    heldout_rows: int = 64
    device: str = "auto"
    precision: str = "auto"

    def overrides(self) -> list[str]:
        return [f"align.steps={self.align_steps}", f"distill.steps={self.distill_steps}",
                f"align.batch_size={self.batch_size}", f"distill.batch_size={self.batch_size}",
                f"align.optim.warmup_steps={min(10, self.align_steps // 5)}",
                f"distill.optim.warmup_steps={min(20, self.distill_steps // 5)}",
                f"eval.retrieval_samples={self.retrieval_samples}", f"eval.heldout_rows={self.heldout_rows}",
                f"eval.retrieval_distances=[{','.join(map(str, DISTANCES))}]",
                f"device={self.device}", f"precision={self.precision}"]


def arm_config(arm: Arm, budget: Budget, out_root: Path, extra: list[str] = ()):
    """The arm's typed ``PrimeConfig`` (the recipe file merged onto the schema, then overrides) and
    its resolved YAML. Plain OmegaConf, so it also runs where Hydra is not installed; the
    config groups Hydra would add (model/data/logger=tiny/none) equal the schema defaults."""
    from omegaconf import OmegaConf

    from factory.config import recipe_values, register_resolvers, to_typed
    from factory.config.schema import PrimeConfig
    from factory.config.validate import validate_inputs, validate_static

    register_resolvers()
    # The study evaluates each arm itself (bench/study/run_study.py), teacher once.
    overrides = [*budget.overrides(), "stages=[select,init,align,distill]", f"select.method={arm.method}",
                 f"seed={arm.seed}", "threads=1",
                 f"output_dir={out_root / arm.name}", "on_existing=overwrite", f"data.cache_dir={out_root / '.cache'}",
                 "checkpoint.every_minutes=0", "align.plot=false", "distill.plot=false", *arm.overrides, *extra]
    merged = OmegaConf.merge(OmegaConf.structured(PrimeConfig), recipe_values(arm.recipe()),
                             OmegaConf.from_dotlist(overrides))
    cfg = to_typed(merged)
    validate_static(cfg)
    validate_inputs(cfg)
    return cfg, OmegaConf.to_yaml(merged, resolve=True)


def recipe_config(arm: Arm):
    """The arm's recipe exactly as shipped (its step counts), for the selection's share of priming."""
    from omegaconf import OmegaConf

    from factory.config import recipe_values, register_resolvers, to_typed
    from factory.config.schema import PrimeConfig

    register_resolvers()
    return to_typed(OmegaConf.merge(OmegaConf.structured(PrimeConfig), recipe_values(arm.recipe())))
