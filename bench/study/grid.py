"""The studies' arms and their typed configs.

Every arm is one pipeline (select -> init -> align -> distill, then the study's own evaluation)
from a ``recipes/gdn_<ratio>pct.yaml`` recipe plus overrides; arms differ only in what they study,
and all use the same align/distill steps and batch (equal training tokens per arm).

``selection`` study (issue 4), groups:
- ``selection``: alternate, swa_proxy, gdn_proxy, kl_trained at 25/50/75% GDN;
- ``variant``: at 50% with ``VARIANT_BASE`` selection, one change each: random gate,
  q/k-norm kept as scale, identity conv, pure next-token loss in stage 2, pre_lm_head alignment.

``levers`` study (issue 15), on the teacher that retrieves, groups:
- ``selection``: the ``SELECTORS`` (alternate, gdn_proxy with and without greedy refinement,
  kl_restore) at 25/50/75% GDN;
- ``variant``: at 50% on the default recipe's selection, one lever each (``LEVER_VARIANTS``):
  synthetic recall rows mixed into priming data, K/V heads expanded to the query heads, norms
  trainable in distill, pre-LM-head alignment, and the recipe's whole stage list (longctx + sft).
  Each is an override string, so a setting that lands later needs no change here.
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

# Issue 15. A selector is a label with its select.* overrides (greedy refinement is a flag, not a method).
SELECTORS = {
    "alternate": ["select.method=alternate"],
    "gdn_proxy": ["select.method=gdn_proxy"],
    "gdn_proxy_greedy": ["select.method=gdn_proxy", "select.greedy=true"],
    "kl_restore": ["select.method=kl_restore"],
    # Not in the default set: kl_restore without retraining between rounds, to measure that choice.
    "kl_restore_once": ["select.method=kl_restore", "select.restore_steps=0"],
}
DEFAULT_SELECTORS = ("alternate", "gdn_proxy", "gdn_proxy_greedy", "kl_restore")
LEVER_VARIANTS = {
    "synthetic_mix": ["data.synthetic_mix=0.25"],
    "kv_expanded": ["init.kv_heads=expanded"],
    "distill_gdn_norms": ["distill.trainable=gdn+norms"],
    "align_pre_lm_head": ["align.loss=pre_lm_head"],
    "full_stages": ["stages=[select,init,align,distill,longctx,sft]"],
}
LEVER_BASE = "gdn_proxy"  # the shipped recipe's selection (recipes/_base.yaml): variants change one thing of it
# Up to the training length (512): 480 fills the row; 1024 shows what lies beyond it.
LEVER_DISTANCES = (64, 128, 256, 480, 1024)


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


def lever_arms(seeds, ratios=RATIOS, selectors=DEFAULT_SELECTORS, variants=tuple(LEVER_VARIANTS),
               base=LEVER_BASE) -> list[Arm]:
    """Issue 15's arms, seed-major: a run cut short keeps every arm of the first seeds."""
    # The selector is in a lever arm's name: levers on another base (--variant-base) are other arms.
    levers = [Arm(f"var-{v}-{base}-r50-s{s}", "variant", base, 0.5, s, v, list(LEVER_VARIANTS[v]))
              for v in variants for s in seeds]
    return sorted(selection_arms(seeds, ratios, selectors) + levers, key=lambda a: a.seed)


def matches(arm: Arm, tokens: list[str]) -> bool:
    """An arm is picked by its name, group, selector, variant or ratio tag (r25, r50, r75), or a
    shell pattern of its name (``sel-kl_restore-*``)."""
    from fnmatch import fnmatch

    tags = {arm.name, arm.group, arm.method, arm.variant, f"r{round(arm.ratio * 100)}"}
    return any(t in tags or fnmatch(arm.name, t) for t in tokens)


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
    distances: tuple = DISTANCES

    def overrides(self) -> list[str]:
        return [f"align.steps={self.align_steps}", f"distill.steps={self.distill_steps}",
                f"align.batch_size={self.batch_size}", f"distill.batch_size={self.batch_size}",
                f"align.optim.warmup_steps={min(10, self.align_steps // 5)}",
                f"distill.optim.warmup_steps={min(20, self.distill_steps // 5)}",
                f"eval.retrieval_samples={self.retrieval_samples}", f"eval.heldout_rows={self.heldout_rows}",
                f"eval.retrieval_distances=[{','.join(map(str, self.distances))}]",
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
    select = SELECTORS.get(arm.method, [f"select.method={arm.method}"])
    overrides = [*budget.overrides(), "stages=[select,init,align,distill]", *select,
                 f"seed={arm.seed}", "threads=1",
                 f"output_dir={out_root / arm.name}", "on_existing=overwrite", f"data.cache_dir={out_root / '.cache'}",
                 "checkpoint.every_minutes=0", *[f"{stage}.plot=false" for stage in ("align", "distill", "longctx", "sft")],
                 *arm.overrides, *extra]
    merged = OmegaConf.merge(OmegaConf.structured(PrimeConfig), recipe_values(arm.recipe()),
                             OmegaConf.from_dotlist(overrides))
    cfg = to_typed(merged)
    validate_static(cfg)
    validate_inputs(cfg)
    return cfg, OmegaConf.to_yaml(merged, resolve=True)


def training_stage(cfg) -> str:
    """The last training stage the arm runs: its model is the one the study evaluates."""
    return [s for s in cfg.stages if s in ("align", "distill", "longctx", "sft")][-1]


def recipe_config(arm: Arm):
    """The arm's recipe exactly as shipped (its step counts), for the selection's share of priming."""
    from omegaconf import OmegaConf

    from factory.config import recipe_values, register_resolvers, to_typed
    from factory.config.schema import PrimeConfig

    register_resolvers()
    return to_typed(OmegaConf.merge(OmegaConf.structured(PrimeConfig), recipe_values(arm.recipe())))
