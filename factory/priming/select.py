"""Which attention layers become GDN.

``manual`` takes a list; ``alternate`` spreads ``round(ratio * L)`` GDN layers evenly, keeping
the first layer attention (its inputs are raw embeddings, the layer least like a recurrence).
``swa_proxy``, ``gdn_proxy`` and ``kl_trained`` score every layer by the damage its replacement
does on long-range tokens (``factory.priming.scoring``) and convert the least damaged ones;
``greedy`` re-scores after fixing each choice. ``kl_restore`` (``factory.priming.restore``) goes the
other way: every layer converted and briefly distilled, attention restored where it lowers the damage most.
Output: ``selection.json`` and a bar chart of per-layer scores with the chosen layers marked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from factory.config.schema import PrimeConfig, SelectConfig
from factory.priming.restore import score_kl_restore
from factory.priming.scoring import FLOPS_FORMULA, METRICS, score_kl_trained, score_proxy

SCORING_METHODS = {"swa_proxy": "swa", "gdn_proxy": "gdn", "kl_trained": "kl_trained", "kl_restore": "kl_restore"}


@dataclass
class Selection:
    method: str
    num_layers: int
    gdn_layers: list[int]
    scores: list[float] = field(default_factory=list)  # per layer; lower = safer to convert
    score_label: str = "1 = kept attention, 0 = GDN"
    calibration_tokens: int = 0
    compute_tokens: int = 0  # tokens through forward passes, in full-forward equivalents
    backward_tokens: int = 0
    compute_flops: float = 0.0
    flops_formula: str = ""
    seconds: float = 0.0
    greedy: bool = False
    greedy_rounds: list[dict] = field(default_factory=list)
    # kl_restore: per round, the damage before, with each converted layer restored, the layer restored
    restore_rounds: list[dict] = field(default_factory=list)
    score_parts: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    priming_flops: float = 0.0  # the config's training stages, same formula
    share_of_priming: float = 0.0

    def layer_types(self) -> list[str]:
        chosen = set(self.gdn_layers)
        return ["linear_attention" if i in chosen else "full_attention" for i in range(self.num_layers)]


def num_gdn_layers(ratio: float, num_layers: int) -> int:
    return min(num_layers - 1, max(1, round(ratio * num_layers)))


def alternate_layers(ratio: float, num_layers: int) -> list[int]:
    """Evenly spaced GDN layers; with ratio 0.5 this is every other layer starting at layer 1."""
    n = num_gdn_layers(ratio, num_layers)
    keep = num_layers - n
    # Attention layers at evenly spaced positions (layer 0 first), GDN everywhere else.
    attention = {round(i * num_layers / keep) for i in range(keep)}
    return [i for i in range(num_layers) if i not in attention]


def check_scoring_config(cfg: SelectConfig) -> None:
    if cfg.metric not in METRICS:
        raise ValueError(f"select.metric={cfg.metric!r} is not accepted; accepted: {', '.join(METRICS)}")
    if cfg.window < 1 or not 0 <= cfg.answer_weight <= 1:
        raise ValueError(f"select.window={cfg.window} must be >= 1 and select.answer_weight={cfg.answer_weight} "
                         "in [0, 1]")


def select_layers(cfg: SelectConfig, num_layers: int, inputs=None) -> Selection:
    """``inputs`` (a ``scoring.ScoringInputs``) is needed by the scoring methods only."""
    start = time.perf_counter()
    if cfg.method in ("manual", "alternate"):
        layers = sorted(cfg.layers or []) if cfg.method == "manual" else alternate_layers(cfg.ratio, num_layers)
        scores = [0.0 if i in layers else 1.0 for i in range(num_layers)]
        return Selection(cfg.method, num_layers, layers, scores, seconds=time.perf_counter() - start)
    if cfg.method not in SCORING_METHODS:
        raise ValueError(f"select.method '{cfg.method}' is not one of: manual, alternate, {', '.join(SCORING_METHODS)}")
    if inputs is None:
        raise ValueError(f"select.method={cfg.method} needs the teacher and calibration data")
    return _scored_selection(cfg, num_layers, inputs, start)


def _scored_selection(cfg: SelectConfig, num_layers: int, inputs, start: float) -> Selection:
    check_scoring_config(cfg)
    n = num_gdn_layers(cfg.ratio, num_layers)
    kind = SCORING_METHODS[cfg.method]
    scorers = {"kl_trained": score_kl_trained, "kl_restore": score_kl_restore}
    result = scorers[kind](cfg, inputs, n) if kind in scorers else score_proxy(cfg, inputs, kind, n)
    params = sum(p.numel() for p in inputs.teacher.parameters())
    what = "KL to teacher" if cfg.metric == "kl" else "loss increase"
    label = (f"drop of damage ({what}) when restored alone, round 1" if kind == "kl_restore"
             else f"damage ({what}, long-range tokens)")
    return Selection(
        cfg.method, num_layers, result.chosen, result.damage, label,
        calibration_tokens=result.calibration["tokens"], compute_tokens=round(result.compute.forward_tokens),
        backward_tokens=result.compute.backward_tokens, compute_flops=result.compute.flops(params),
        flops_formula=f"{FLOPS_FORMULA}; N={params}", seconds=time.perf_counter() - start,
        greedy=cfg.greedy, greedy_rounds=result.rounds if cfg.greedy else [], score_parts=result.parts,
        calibration=result.calibration, restore_rounds=result.rounds if kind == "kl_restore" else [])


# FLOPs per token of each training stage, in units of N (teacher parameters): align runs the
# teacher stream forward (its GDN-only backward left out: a lower bound); distill a teacher
# forward and a student forward + backward; longctx and sft a student forward + backward (a
# teacher forward more when their loss is KL).
STAGE_FLOPS_PER_TOKEN = {"align": 2, "distill": 2 + 6, "longctx": 6, "sft": 6}


def priming_flops(cfg: PrimeConfig, params: int) -> float:
    """Compute of the config's training stages, same formula as the selection's."""
    total = 0.0
    for stage, per_token in STAGE_FLOPS_PER_TOKEN.items():
        if stage in cfg.stages:
            s = getattr(cfg, stage)
            total += per_token * params * s.steps * s.batch_size * s.grad_accum * (s.seq_len or cfg.data.seq_len)
    return total


def add_priming_share(selection: Selection, cfg: PrimeConfig, params: int) -> Selection:
    selection.priming_flops = priming_flops(cfg, params)
    if selection.priming_flops:
        selection.share_of_priming = selection.compute_flops / selection.priming_flops
    return selection


def write_selection(selection: Selection, out_dir: Path) -> None:
    (out_dir / "selection.json").write_text(json.dumps(asdict(selection), indent=2) + "\n")
    plot_selection(selection, out_dir / "selection.png")


def read_selection(stage_dir: Path) -> Selection:
    return Selection(**json.loads((Path(stage_dir) / "selection.json").read_text()))


def plot_selection(selection: Selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = set(selection.gdn_layers)
    colors = ["tab:orange" if i in chosen else "tab:blue" for i in range(selection.num_layers)]
    fig, ax = plt.subplots(figsize=(max(4, selection.num_layers * 0.45), 3))
    ax.bar(range(selection.num_layers), selection.scores, color=colors)
    ax.set_xticks(range(selection.num_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("lower: safer as GDN", fontsize=8)
    ax.set_title(f"{selection.method}: {selection.score_label}\nGDN layers in orange "
                 f"({len(chosen)}/{selection.num_layers})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
