"""Issue 15's study report: recall kept per task by selector, GDN share and lever, with the seed
spread, the goal verdicts and two figures. Used by report.py for results of ``run_study.py --study
levers``.

Recall of a task is the product's headline (``factory.eval.recall.by_task``, as the eval summary
prints it): greedy exact match averaged over the distances up to the training length; "kept" is
the hybrid's share of the teacher's on the same prompts. Cells show ``mean (min..max)`` over seeds.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

SECTION = "## Levers study (issue 15)"
TODAY = ("alternate", "default")  # today's default recipe: alternate selection, no lever changed
GOAL_SEEDS = 3
RATIO_GOALS = {0.5: 0.90, 0.25: 0.97}  # share of the teacher's recall to keep on every task


# ------------------------------------------------------------------ metrics


def summarize(evaluation: dict, teacher: dict) -> dict:
    """Per task recall of teacher and hybrid and the share kept, KL and the held-out loss gap."""
    from factory.eval.recall import by_task, compare

    train_len = evaluation.get("train_seq_len", teacher.get("train_seq_len", 512))
    tasks = by_task(compare(_str_keys(teacher["retrieval"]), _str_keys(evaluation["retrieval"])), train_len)
    h = evaluation["heldout"]
    return {"recall": tasks, "kl": h["kl"],
            "loss_gap_pct": 100 * (h["student_loss"] - h["teacher_loss"]) / h["teacher_loss"]}


def _str_keys(retrieval: dict) -> dict:
    """Distances as JSON has them: a fresh evaluation has int keys, one read back from a file str keys."""
    return {task: {str(d): v for d, v in by_distance.items()} for task, by_distance in retrieval.items()}


def with_summaries(results: dict) -> dict:
    """Each arm with its ``summary`` (computed here when the results file predates it)."""
    for arm in results["arms"].values():
        arm.setdefault("summary", summarize(arm["eval"], results["teacher"]))
    return results


def grouped(arms: dict) -> dict:
    """{(selector, variant, ratio): [arm, ...] by seed}."""
    out = defaultdict(list)
    for arm in arms.values():
        out[(arm["method"], arm["variant"], arm["ratio"])].append(arm)
    return {k: sorted(v, key=lambda a: a["seed"]) for k, v in out.items()}


def tasks_of(results: dict) -> list[str]:
    return list(results["teacher"]["retrieval"])


def kept(arms: list[dict], task: str) -> list[float]:
    return [a["summary"]["recall"][task]["kept"] or 0.0 for a in arms]


def recall(arms: list[dict], task: str | None = None) -> list[float]:
    """The hybrid's recall on one task, or averaged over tasks."""
    def one(a):
        rows = a["summary"]["recall"]
        return rows[task]["hybrid"] if task else statistics.mean(r["hybrid"] for r in rows.values())
    return [one(a) for a in arms]


def value(arms: list[dict], key: str) -> list[float]:
    return [a["summary"][key] for a in arms]


def cell(values: list[float], fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not values:
        return "-"
    v = [x * scale for x in values]
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"


# ------------------------------------------------------------------ tables


def teacher_table(results: dict) -> list[str]:
    t = results["teacher"]
    distances = list(next(iter(t["retrieval"].values())))
    lines = [f"Held-out loss {t['heldout']['teacher_loss']:.4f}; training length {t.get('train_seq_len', 512)}.", "",
             "| task | " + " | ".join(f"recall @{d}" for d in distances) + " |", "|---|" + "---|" * len(distances)]
    for task, by_distance in t["retrieval"].items():
        lines.append(f"| {task} | " + " | ".join(f"{by_distance[d]:.2f}" for d in distances) + " |")
    return lines


def _head(first: str, tasks: list[str], extra: list[str]) -> list[str]:
    cols = [first, "seeds", *[f"{t} kept %" for t in tasks], *[f"{t} recall" for t in tasks], "KL",
            "loss gap %", *extra]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _cells(arms: list[dict], tasks: list[str]) -> list[str]:
    return [str(len(arms)), *[cell(kept(arms, t), "{:.0f}", 100) for t in tasks],
            *[cell(recall(arms, t), "{:.2f}") for t in tasks], cell(value(arms, "kl"), "{:.3f}"),
            cell(value(arms, "loss_gap_pct"), "{:.2f}")]


def selection_table(groups: dict, tasks: list[str], ratio: float) -> list[str]:
    lines = _head("selector", tasks, ["select s", "% of recipe priming", "GDN layers (per seed)"])
    for (selector, variant, r), arms in sorted(groups.items()):
        if variant != "default" or r != ratio:
            continue
        sel = [a["selection"] for a in arms]
        layers = "; ".join(",".join(map(str, s["gdn_layers"])) for s in sel)
        lines.append("| " + " | ".join([selector, *_cells(arms, tasks), cell([s["seconds"] for s in sel], "{:.1f}"),
                                        cell([s["share_of_recipe_priming"] for s in sel], "{:.2f}", 100),
                                        layers]) + " |")
    return lines


def variant_table(groups: dict, tasks: list[str]) -> list[str]:
    lines = _head("lever at 50% (selector)", tasks, [])
    variants = sorted((k, arms) for k, arms in groups.items() if k[1] != "default" and k[2] == 0.5)
    bases = sorted({k[0] for k, _ in variants})
    rows = [(f"none ({b})", groups.get((b, "default", 0.5), [])) for b in bases]
    rows += [(f"{v} ({s})", arms) for (s, v, _), arms in variants]
    for label, arms in rows:
        if arms:
            lines.append("| " + " | ".join([label, *_cells(arms, tasks)]) + " |")
    return lines


# ------------------------------------------------------------------ goals


def parse_default(text: str) -> tuple[str, str]:
    """``SELECTOR`` or ``SELECTOR:VARIANT`` (a lever's arms run with one selector at 50%)."""
    selector, _, variant = text.partition(":")
    return selector, variant or "default"


def _label(default: tuple[str, str]) -> str:
    return f"`{default[0]}`" + (f" with `{default[1]}`" if default[1] != "default" else "")


def recall_goal(groups: dict, tasks: list[str], default: tuple[str, str], ratio: float, bound: float) -> str:
    arms, pct = groups.get((*default, ratio), []), round(ratio * 100)
    if not arms:
        return f"- NOT MET: at {pct}% GDN no arm of {_label(default)} ran (goal: >= {bound:.0%} of the teacher's recall)"
    spans = ", ".join(f"{t} {100 * min(kept(arms, t)):.0f}..{100 * max(kept(arms, t)):.0f}%" for t in tasks)
    met = len(arms) >= GOAL_SEEDS and all(min(kept(arms, t)) >= bound for t in tasks)
    return (f"- {'MET' if met else 'NOT MET'}: at {pct}% GDN {_label(default)} keeps {spans} of the teacher's recall "
            f"at the training length (goal: >= {bound:.0%} on every task in each of {GOAL_SEEDS} seeds; "
            f"{len(arms)} seed(s) ran)")


def beats_alternate_goal(groups: dict, selector: str, ratio: float) -> str:
    pct = round(ratio * 100)
    ours, alt = (recall(groups.get((s, "default", ratio), [])) for s in (selector, "alternate"))
    if selector == "alternate":
        return f"- NOT MET: at {pct}% GDN the default selection is `alternate` itself, so it cannot beat it"
    if not ours or not alt:
        return f"- NOT MET: at {pct}% GDN `{selector}` or `alternate` has no arm (nothing to compare)"
    verdict = "MET" if min(ours) > max(alt) else "NOT MET"
    return (f"- {verdict}: at {pct}% GDN `{selector}` against `alternate` on recall (mean over tasks): "
            f"{min(ours):.2f}..{max(ours):.2f} vs {min(alt):.2f}..{max(alt):.2f} (seed ranges; met = no overlap)")


def kl_goal(groups: dict, default: tuple[str, str]) -> str:
    if default == TODAY:
        return "- NOT MET: the default is today's (`alternate`, no lever), so its KL cannot be lower than itself"
    ours, today = value(groups.get((*default, 0.5), []), "kl"), value(groups.get((*TODAY, 0.5), []), "kl")
    if not ours or not today:
        return f"- NOT MET: at 50% GDN {_label(default)} or today's default has no arm (nothing to compare)"
    lower = statistics.mean(ours) < statistics.mean(today)
    where = "outside" if max(ours) < min(today) else "inside"
    return (f"- {'MET' if lower else 'NOT MET'}: KL at 50% GDN, {_label(default)} against today's default "
            f"(`alternate`): {cell(ours)} vs {cell(today)} (mean lower {where} the seed spread)")


def goals(groups: dict, tasks: list[str], default: tuple[str, str]) -> list[str]:
    lines = [recall_goal(groups, tasks, default, ratio, bound) for ratio, bound in RATIO_GOALS.items()]
    lines += [beats_alternate_goal(groups, default[0], ratio) for ratio in (0.5, 0.75)]
    return lines + [kl_goal(groups, default)]


# ------------------------------------------------------------------ figures


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on the machines that draw these)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, axes, ylabel: str, path: Path, legend: bool = True) -> None:
    """The study figures' common ending: y label on the first panel, legend on the last, saved, closed."""
    axes[0][0].set_ylabel(ylabel)
    if legend:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _errorbar(ax, xs, series: list[list[float]], **kwargs) -> None:
    mean = [statistics.mean(v) for v in series]
    ax.errorbar(xs, mean, yerr=[[m - min(v) for m, v in zip(mean, series)], [max(v) - m for m, v in zip(mean, series)]],
                marker="o", capsize=3, **kwargs)


def plot_kept(groups: dict, tasks: list[str], path: Path) -> None:
    """Share of the teacher's recall kept against the GDN share, per selector, one panel a task."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), sharey=True, squeeze=False)
    selectors = sorted({k[0] for k in groups if k[1] == "default"})
    for ax, task in zip(axes[0], tasks):
        for selector in selectors:
            ratios = sorted(r for s, v, r in groups if s == selector and v == "default")
            _errorbar(ax, [100 * r for r in ratios], [kept(groups[(selector, "default", r)], task) for r in ratios],
                      label=selector)
        for bound in sorted(set(RATIO_GOALS.values())):
            ax.axhline(bound, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task}: recall kept at the training length", fontsize=9)
        ax.set_xlabel("GDN share of layers (%)")
    save_figure(plt, fig, axes, "hybrid / teacher recall (seed range)", path)


def plot_distance(results: dict, groups: dict, tasks: list[str], ratio: float, path: Path) -> None:
    """Recall by distance at one GDN share: the teacher and each selector (seed range)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), sharey=True, squeeze=False)
    teacher = results["teacher"]["retrieval"]
    for ax, task in zip(axes[0], tasks):
        distances = list(teacher[task])
        xs = [int(d) for d in distances]
        ax.plot(xs, [teacher[task][d] for d in distances], "k--", label="teacher")
        for (selector, variant, r), arms in sorted(groups.items()):
            if variant == "default" and r == ratio:
                _errorbar(ax, xs, [[a["eval"]["retrieval"][task][d] for a in arms] for d in distances], label=selector)
        ax.axvline(results["teacher"].get("train_seq_len", 512), color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task} at {round(ratio * 100)}% GDN", fontsize=9)
        ax.set_xlabel("distance (tokens); dotted: training length")
    save_figure(plt, fig, axes, "recall (greedy exact match)", path)


FIGURES = {"kept": "study_levers_kept.png", "distance": "study_levers_distance.png"}


def write_figures(results: dict, folder: Path) -> None:
    groups, tasks = grouped(with_summaries(results)["arms"]), tasks_of(results)
    folder.mkdir(parents=True, exist_ok=True)
    plot_kept(groups, tasks, folder / FIGURES["kept"])
    plot_distance(results, groups, tasks, 0.5, folder / FIGURES["distance"])


# ------------------------------------------------------------------ document


def section(results: dict, default: str, figures_rel: str = "figures") -> str:
    groups, tasks = grouped(with_summaries(results)["arms"]), tasks_of(results)
    b, ratios = results["budget"], sorted({k[2] for k in groups if k[1] == "default"})
    out = [SECTION, "", "_Generated by `bench/study/report.py` from the results of `bench/study/run_study.py "
           "--study levers`._", "",
           f"Arms: {len(results['arms'])}. Every arm: align {b['align_steps']} + distill {b['distill_steps']} steps of "
           f"{b['batch_size']} rows (equal training tokens; the `full_stages` lever adds the recipe's longctx and sft); "
           f"eval on {b['heldout_rows']} held-out rows and {b['retrieval_samples']} samples per task and distance, "
           "the same prompts for every arm. Recall: mean over the distances up to the training length; kept: the "
           "hybrid's share of the teacher's. Cells: mean (min..max) over seeds.", "",
           "### Teacher", "", *teacher_table(results), ""]
    for ratio in ratios:
        out += [f"### Selection at {round(ratio * 100)}% GDN", "", *selection_table(groups, tasks, ratio), ""]
    out += [f"![recall kept against GDN share]({figures_rel}/{FIGURES['kept']})", "",
            f"![recall by distance at 50%]({figures_rel}/{FIGURES['distance']})", ""]
    if any(k[1] != "default" for k in groups):
        out += ["### Levers at 50% GDN", "", *variant_table(groups, tasks), ""]
    out += [f"### Goals, evaluated for {_label(parse_default(default))}", "",
            *goals(groups, tasks, parse_default(default)), ""]
    return "\n".join(out)
