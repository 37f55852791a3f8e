"""Tables, plots and goal verdicts of the study, written into docs/QUALITY.md.

Issue 15 (results of ``run_study.py --study levers``; tables printed, figures and markdown where asked;
QUALITY.md's section "## Levers study (issue 15)" only with --quality):

    python bench/study/report.py results.json --default kl_restore --figures docs/figures --markdown levers.md

Issue 4:

    python bench/study/report.py bench/study/results.json [--quality docs/QUALITY.md]
    # as docs/QUALITY.md was generated (tests/unit/test_study_report.py keeps the two in step):
    python bench/study/report.py bench/study/results.json --default alternate \
        --candidate bench/study/results_candidate.json --goals-on-candidate

Only the section "## Selection and initialization study (issue 4)" is rewritten; other
sections of QUALITY.md stay as they are. The hand-written setup and conclusion come from
bench/study/conclusion.md and are included verbatim.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # factory, and levers.py beside this file
from levers import pyplot, save_figure  # noqa: E402  (beside this file; the figures' common parts)

SECTION = "## Selection and initialization study (issue 4)"
WITHIN, BEYOND, LONG = (32,), (128, 256, 480), (1024, 2048)
DEFAULT_SIZE = (8, 8)  # select.calibration_rows, select.calibration_samples
TRAIN_LEN_DISTANCE = 480  # the fact 480 tokens back: a sample fills the 512-token training window
FIGURES = ROOT / "docs" / "figures"


# ------------------------------------------------------------------ metrics


def retrieval(by_task: dict, distances) -> float:
    """Accuracy averaged over tasks (kv, passkey) and the given distances."""
    return statistics.mean(by_task[t][str(d)] for t in by_task for d in distances)


def metrics(arm: dict) -> dict:
    ev = arm["eval"]
    h, student = ev["heldout"], ev["retrieval"]
    out = {"loss_gap_pct": 100 * (h["student_loss"] - h["teacher_loss"]) / h["teacher_loss"], "kl": h["kl"],
           "within": retrieval(student, WITHIN), "beyond": retrieval(student, BEYOND),
           "at_train_len": retrieval(student, (TRAIN_LEN_DISTANCE,)),
           "x2": retrieval(student, (1024,)), "x4": retrieval(student, (2048,)),
           "select_s": arm["stages"]["select"]["seconds"]}
    return out


def teacher_metrics(teacher: dict) -> dict:
    t = teacher["retrieval"]
    return {"loss": teacher["heldout"]["teacher_loss"], "within": retrieval(t, WITHIN), "beyond": retrieval(t, BEYOND),
            "at_train_len": retrieval(t, (TRAIN_LEN_DISTANCE,)), "x2": retrieval(t, (1024,)),
            "x4": retrieval(t, (2048,))}


def grouped(arms: dict) -> dict:
    """{(group, variant, method, ratio): [arm, ...]} over seeds."""
    out = defaultdict(list)
    for arm in arms.values():
        out[(arm["group"], arm["variant"], arm["method"], arm["ratio"])].append(arm)
    return out


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def column(arms: list[dict], key: str) -> list[float]:
    return [metrics(a)[key] for a in arms]


# ------------------------------------------------------------------ tables

COLUMNS = (("loss gap %", "loss_gap_pct", "{:.2f}"), ("KL", "kl", "{:.4f}"), ("ret. @32 (within)", "within", "{:.2f}"),
           ("ret. 128-480 (beyond)", "beyond", "{:.2f}"), ("ret. @1024 (2x)", "x2", "{:.2f}"),
           ("ret. @2048 (4x)", "x4", "{:.2f}"))


def _row(label: str, arms: list[dict], extra: list[str] = ()) -> str:
    cells = [spread(column(arms, key), fmt) for _, key, fmt in COLUMNS]
    return "| " + " | ".join([label, str(len(arms)), *cells, *extra]) + " |"


def teacher_table(teacher: dict) -> list[str]:
    t = teacher_metrics(teacher)
    return ["| teacher | held-out loss | ret. @32 | ret. 128-480 | ret. @480 | ret. @1024 | ret. @2048 |",
            "|---|---|---|---|---|---|---|",
            f"| embedded | {t['loss']:.4f} | {t['within']:.2f} | {t['beyond']:.2f} | {t['at_train_len']:.2f} | "
            f"{t['x2']:.2f} | {t['x4']:.2f} |"]


def selection_table(groups: dict, methods: list[str], ratio: float) -> list[str]:
    head = ["method", "seeds", *[c[0] for c in COLUMNS], "GDN layers (per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        arms = sorted(groups.get(("selection", "default", method, ratio), []), key=lambda a: a["seed"])
        if not arms:
            continue
        layers = "; ".join(",".join(map(str, a["selection"]["gdn_layers"])) for a in arms)
        lines.append(_row(method, arms, [layers]))
    return lines


def variant_table(groups: dict, base: str) -> list[str]:
    head = ["variant (50%, " + base + ")", "seeds", *[c[0] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("default (published gate, q/k-norm dropped, default conv, KL stage 2, layerwise align)",
             groups.get(("selection", "default", base, 0.5), []))]
    rows += sorted(((v, arms) for (g, v, m, r), arms in groups.items() if g == "variant"), key=lambda x: x[0])
    for label, arms in rows:
        if arms:
            lines.append(_row(label, sorted(arms, key=lambda a: a["seed"])))
    return lines


def init_table(groups: dict, candidate: dict, label: str, ratio: float) -> list[str]:
    """Each selection method with the published initialization and with the candidate's."""
    head = ["method, initialization", "seeds", *[c[0] for c in COLUMNS], "GDN layers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ("alternate", "gdn_proxy"):
        for init, source in (("published", groups), (label, candidate)):
            arms = sorted(source.get(("selection", "default", method, ratio), []), key=lambda a: a["seed"])
            if arms:
                lines.append(_row(f"{method}, {init}", arms, [",".join(map(str, arms[0]["selection"]["gdn_layers"]))]))
    return lines


# ------------------------------------------------------------------ goals


def beats_outside_spread(a: list[float], b: list[float]) -> bool:
    """Every seed of ``a`` above every seed of ``b`` (the seed ranges do not overlap)."""
    return bool(a and b) and min(a) > max(b)


def goals(groups: dict, default: str, teacher: dict, calibration: list[dict]) -> list[str]:
    if default == "alternate":  # the goals' comparison is against alternate itself
        return ["- NOT MET: the default selection is `alternate` itself, so it cannot beat `alternate` on "
                "retrieval beyond the window (no measured method beat it with this initialization; above)",
                "- MET: selection cost of `alternate` is 0 (it reads no data)", *_quality_goals(groups, default, teacher)]
    lines = []
    for ratio in (0.5, 0.75):
        d = column(groups.get(("selection", "default", default, ratio), []), "beyond")
        alt = column(groups.get(("selection", "default", "alternate", ratio), []), "beyond")
        if d and alt:
            verdict = "MET" if beats_outside_spread(d, alt) else "NOT MET"
            lines.append(f"- {verdict}: at {round(ratio * 100)}% GDN, `{default}` vs `alternate` on retrieval beyond "
                         f"the window (128-480): {min(d):.2f}..{max(d):.2f} vs {min(alt):.2f}..{max(alt):.2f} "
                         f"(seed ranges; met = no overlap)")
    runs = [r for r in calibration if r["method"] == default and (r["rows"], r["samples"]) == DEFAULT_SIZE]
    if runs:
        share = max(100 * r["share_of_recipe_priming"] for r in runs)
        lines.append(f"- {'MET' if share <= 2 else 'NOT MET'}: selection cost of `{default}` (default calibration, "
                     f"{DEFAULT_SIZE[0]} held-out rows + {DEFAULT_SIZE[1]} retrieval samples) is {share:.2f}% of the "
                     "compute of the shipped gdn_50pct recipe's training stages (same FLOP formula)")
    return lines + _quality_goals(groups, default, teacher)


def _quality_goals(groups: dict, default: str, teacher: dict) -> list[str]:
    """The 50% hybrid's held-out loss and retrieval at the training length against the teacher's."""
    lines, arms50 = [], groups.get(("selection", "default", default, 0.5), [])
    if arms50:
        gaps, t = column(arms50, "loss_gap_pct"), teacher_metrics(teacher)
        verdict = "MET" if max(gaps) <= 2 else "NOT MET"
        lines.append(f"- {verdict}: 50% hybrid held-out loss within 2% of the teacher's: gap "
                     f"{min(gaps):.2f}..{max(gaps):.2f}%")
        rel = [metrics(a)["at_train_len"] / max(1e-9, t["at_train_len"]) for a in arms50]
        verdict = "MET" if min(rel) >= 0.95 else "NOT MET"
        lines.append(f"- {verdict}: 50% hybrid retrieval at the training length (distance {TRAIN_LEN_DISTANCE}) "
                     f">= 95% of the teacher's: {100 * min(rel):.0f}..{100 * max(rel):.0f}% of the teacher")
    return lines


def cost_table(calibration: list[dict]) -> list[str]:
    """Cost and stability of the scoring methods by calibration size (calibration.py)."""
    head = ["method", "held-out rows + retrieval samples", "calibration tokens", "seeds",
            "GDN layers at 25% / 50% / 75% (per calibration seed)", "seconds", "% of recipe priming"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["method"], r["rows"], r["samples"]) for r in calibration})
    for method, rows, samples in keys:
        runs = sorted((r for r in calibration if (r["method"], r["rows"], r["samples"]) == (method, rows, samples)),
                      key=lambda r: r["seed"])
        chosen = " / ".join("; ".join(",".join(map(str, r["chosen"][ratio])) for r in runs)
                            for ratio in ("0.25", "0.5", "0.75"))
        lines.append(f"| {method} | {rows} + {samples} | {runs[0]['calibration_tokens']} | {len(runs)} | {chosen} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.1f} | "
                     f"{100 * max(r['share_of_recipe_priming'] for r in runs):.2f} |")
    return lines


# ------------------------------------------------------------------ plots


def plot_retrieval(groups: dict, methods: list[str], ratios: list[float], teacher: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.4), sharey=True, squeeze=False)
    t = teacher["retrieval"]
    distances = sorted(int(d) for d in t["kv"])
    for ax, ratio in zip(axes[0], ratios):
        ax.plot(distances, [retrieval(t, (d,)) for d in distances], "k--", label="teacher")
        for method in methods:
            arms = groups.get(("selection", "default", method, ratio), [])
            if not arms:
                continue
            acc = [[retrieval(a["eval"]["retrieval"], (d,)) for a in arms] for d in distances]
            mean = [statistics.mean(v) for v in acc]
            ax.errorbar(distances, mean, yerr=[[m - min(v) for m, v in zip(mean, acc)],
                                               [max(v) - m for m, v in zip(mean, acc)]],
                        marker="o", capsize=3, label=method)
        ax.axvline(64, color="grey", lw=0.8)
        ax.axvline(512, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{round(ratio * 100)}% GDN")
        ax.set_xlabel("distance (tokens); window 64, train length 512")
    save_figure(plt, fig, axes, "retrieval accuracy (kv + passkey)", path)


def plot_scores(groups: dict, ratio: float, path: Path) -> None:
    plt = pyplot()
    methods = [m for m in ("swa_proxy", "gdn_proxy", "kl_trained") if groups.get(("selection", "default", m, ratio))]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3), squeeze=False)
    for ax, method in zip(axes[0], methods):
        arm = min(groups[("selection", "default", method, ratio)], key=lambda a: a["seed"])
        scores, chosen = arm["selection"]["scores"], set(arm["selection"]["gdn_layers"])
        ax.bar(range(len(scores)), scores, color=["tab:orange" if i in chosen else "tab:blue" for i in range(len(scores))])
        ax.set_title(f"{method} (seed {arm['seed']}): GDN in orange", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_xticks(range(len(scores)))
    save_figure(plt, fig, axes, "damage on long-range tokens", path, legend=False)


# ------------------------------------------------------------------ document


def selection_methods(groups: dict) -> list[str]:
    return [m for m in ("alternate", "swa_proxy", "gdn_proxy", "kl_trained")
            if any(k[2] == m and k[0] == "selection" for k in groups)]


def selection_ratios(groups: dict) -> list[float]:
    return sorted({k[3] for k in groups if k[0] == "selection"})


def write_figures(results: dict) -> None:
    groups = grouped(results["arms"])
    FIGURES.mkdir(parents=True, exist_ok=True)
    plot_retrieval(groups, selection_methods(groups), selection_ratios(groups), results["teacher"],
                   FIGURES / "study_retrieval.png")
    plot_scores(groups, 0.5, FIGURES / "study_layer_scores.png")


def section(results: dict, default: str, conclusion: str, calibration: list[dict], candidate: dict | None = None,
            label: str = "", goals_on_candidate: bool = False) -> str:
    arms = results["arms"]
    groups = grouped(arms)
    candidate_groups = grouped(candidate["arms"]) if candidate else {}
    methods, ratios = selection_methods(groups), selection_ratios(groups)
    b = results["budget"]
    out = [SECTION, "", "_Generated by `bench/study/report.py` from `bench/study/results.json`; rerun the study "
           "with `bench/study/run_study.py`._", "",
           f"Arms: {len(arms)}. Every arm: align {b['align_steps']} steps + distill {b['distill_steps']} steps of "
           f"{b['batch_size']} rows x 512 tokens (equal training tokens per arm); eval on {b['heldout_rows']} held-out "
           f"rows and {b['retrieval_samples']} samples per task and distance. Cells: mean ± sd over seeds.", "",
           "### Teacher", "", *teacher_table(results["teacher"]), ""]
    for ratio in ratios:
        out += [f"### Selection methods at {round(ratio * 100)}% GDN", "", *selection_table(groups, methods, ratio), ""]
    out += ["![retrieval by distance](figures/study_retrieval.png)", "",
            "![per-layer damage at 50%](figures/study_layer_scores.png)", ""]
    if any(k[0] == "variant" for k in groups):
        out += ["### Initialization, stage-2 loss and alignment variants", "", *variant_table(groups, "swa_proxy"), ""]
    if candidate_groups:
        out += [f"### Selection with the candidate initialization ({label})", "",
                f"From `{candidate['source']}` ({len(candidate['arms'])} arms, the same budget and evaluation).", ""]
        for ratio in sorted({k[3] for k in candidate_groups}):
            out += [f"#### {round(ratio * 100)}% GDN", "", *init_table(groups, candidate_groups, label, ratio), ""]
    if calibration:
        out += ["### Selection cost and stability", "", *cost_table(calibration), ""]
    on = candidate_groups if goals_on_candidate else groups
    title = f"the default recipe (`{default}`, {label})" if goals_on_candidate else f"`{default}`"
    out += [f"### Goals, evaluated for {title}", "", *goals(on, default, results["teacher"], calibration), ""]
    return "\n".join(out) + "\n" + conclusion.strip() + "\n"


def write_quality(path: Path, text: str, section_title: str = SECTION) -> None:
    """Replace our section (up to the next ``## `` heading) or append it; other sections stay."""
    old = path.read_text() if path.exists() else "# Quality\n"
    if section_title in old:
        start = old.index(section_title)
        end = old.find("\n## ", start + len(section_title))
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--quality", type=Path, help="QUALITY.md to write the section into (issue 4: docs/QUALITY.md)")
    p.add_argument("--default", help="the selection (levers: SELECTOR or SELECTOR:LEVER) the goals are evaluated for "
                                     "(issue 4: swa_proxy; levers: alternate)")
    p.add_argument("--figures", type=Path, default=FIGURES, help="levers: where the figures go")
    p.add_argument("--markdown", type=Path, help="levers: also write the section to this file")
    p.add_argument("--conclusion", type=Path, default=Path(__file__).with_name("conclusion.md"))
    p.add_argument("--calibration", type=Path, default=Path(__file__).with_name("calibration.json"))
    p.add_argument("--candidate", type=Path, help="arms run with the candidate initialization (run_study.py --set ...)")
    p.add_argument("--candidate-label", default="random gate, identity conv")
    p.add_argument("--goals-on-candidate", action="store_true", help="evaluate the goals on the --candidate arms")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results.get("study") == "levers":
        return levers_report(results, args)
    conclusion = args.conclusion.read_text() if args.conclusion.exists() else ""
    calibration = json.loads(args.calibration.read_text()) if args.calibration.exists() else []
    candidate = None
    if args.candidate:
        candidate = {**json.loads(args.candidate.read_text()), "source": str(args.candidate)}
    quality = args.quality or ROOT / "docs" / "QUALITY.md"
    write_figures(results)
    write_quality(quality, section(results, args.default or "swa_proxy", conclusion, calibration, candidate,
                                   args.candidate_label, args.goals_on_candidate))
    print(f"wrote {quality} and {FIGURES}/study_*.png")


def levers_report(results: dict, args) -> None:
    import levers

    levers.write_figures(results, args.figures)
    document = args.quality or args.markdown  # figure links are relative to the document that holds them
    where = os.path.relpath(args.figures.resolve(), document.resolve().parent) if document else str(args.figures)
    text = levers.section(results, args.default or "alternate", where)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.quality:
        write_quality(args.quality, text, levers.SECTION)


if __name__ == "__main__":
    main()
