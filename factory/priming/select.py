"""Which attention layers become GDN.

``manual`` takes a list; ``alternate`` spreads ``round(ratio * L)`` GDN layers evenly, keeping
the first layer attention (its inputs are raw embeddings, the layer least like a recurrence).
Output: ``selection.json`` and a bar chart of per-layer scores with the chosen layers marked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from factory.config.schema import SelectConfig


@dataclass
class Selection:
    method: str
    num_layers: int
    gdn_layers: list[int]
    scores: list[float] = field(default_factory=list)  # higher = safer to convert
    calibration_tokens: int = 0
    compute_tokens: int = 0
    compute_flops: float = 0.0
    seconds: float = 0.0

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


def select_layers(cfg: SelectConfig, num_layers: int) -> Selection:
    start = time.perf_counter()
    if cfg.method == "manual":
        layers = sorted(cfg.layers or [])
    elif cfg.method == "alternate":
        layers = alternate_layers(cfg.ratio, num_layers)
    else:
        raise ValueError(f"select.method '{cfg.method}' is not one of: manual, alternate")
    scores = [1.0 if i in layers else 0.0 for i in range(num_layers)]
    return Selection(cfg.method, num_layers, layers, scores, seconds=time.perf_counter() - start)


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
    fig, ax = plt.subplots(figsize=(max(4, selection.num_layers * 0.35), 3))
    ax.bar(range(selection.num_layers), selection.scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("score (higher: safer as GDN)")
    ax.set_title(f"{selection.method}: GDN layers in orange ({len(chosen)}/{selection.num_layers})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
