"""Run a study's arms (bench/study/grid.py) and gather their results into one JSON file.

Each arm is one ``factory.pipeline.run_pipeline`` call in a fresh process (one thread each),
``--workers`` at a time; results are merged into ``--results`` as arms finish, so a cut-short
run keeps what it finished, and a rerun skips arms already there.

    python bench/study/run_study.py --results /tmp/study/results.json --workers 1            # CPU
    python bench/study/run_study.py --workers 12 --gdn-kernel naive --arms r50 ...           # one GPU
    python bench/study/run_study.py --smoke --results /tmp/smoke.json                        # one tiny arm
    python bench/study/report.py /tmp/study/results.json                                     # tables, plots

``--study levers`` (issue 15, the default) or ``selection`` (issue 4). ``--arms`` picks arms by
name, group, selector, variant, ratio tag or name pattern (grid.matches). ``--gdn-kernel naive``
runs the pure-torch GDN reference on CUDA too (no Triton compile per process); the math is the one
the CPU runs. ``--deadline-at`` (epoch seconds) starts no arm that would not end by then, judged
by the slowest arm so far (``--arm-estimate-s`` before any ends), and stops the arms still
running at the deadline, keeping the results of those that ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import (DEFAULT_SELECTORS, DISTANCES, LEVER_BASE, LEVER_DISTANCES, LEVER_VARIANTS, METHODS,  # noqa: E402
                  SELECTORS, VARIANTS, Arm, Budget, arm_config, lever_arms, matches, recipe_config, selection_arms,
                  training_stage, variant_arms)
from levers import summarize  # noqa: E402
from scheduler import run_arms  # noqa: E402

SMOKE = dict(align_steps=2, distill_steps=2, batch=2, retrieval_samples=2, heldout_rows=2, workers=0)
SMOKE_ARM = "sel-alternate-r50-s0"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", choices=("levers", "selection"), default="levers")
    p.add_argument("--out", type=Path, default=Path("/tmp/study"), help="pipeline directories")
    p.add_argument("--results", type=Path, default=Path("/tmp/study/results.json"))
    p.add_argument("--workers", type=int, default=1, help="0: arms run one after another in this process")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant-seeds", default="0,1,2", help="selection study only")
    p.add_argument("--ratios", default="0.25,0.5,0.75")
    p.add_argument("--methods", help="selectors (levers: any of grid.SELECTORS, default all but kl_restore_once; "
                                     "selection: grid.METHODS)")
    p.add_argument("--variants", help="variants (default: the study's all)")
    p.add_argument("--variant-base", default=LEVER_BASE, help="levers: the selector the variants run with")
    p.add_argument("--arms", help="comma list: names, groups, selectors, variants, r25/r50/r75, name patterns")
    p.add_argument("--align-steps", type=int, help="per arm (default: levers 150, selection 150)")
    p.add_argument("--distill-steps", type=int, help="per arm (default: levers 100 as the recipe, selection 300)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--retrieval-samples", type=int, default=64)
    p.add_argument("--heldout-rows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--gdn-kernel", choices=("auto", "naive"), default="auto")
    p.add_argument("--max-minutes", type=float, default=0, help="start no arm after this many minutes (0: no limit)")
    p.add_argument("--deadline-at", type=float, default=0, help="epoch seconds by which every arm has ended")
    p.add_argument("--arm-estimate-s", type=float, default=120, help="an arm's wall time until one has ended")
    p.add_argument("--smoke", action="store_true", help=f"one tiny-budget arm ({SMOKE_ARM}) in this process")
    p.add_argument("--set", action="append", default=[], help="extra config override for every arm")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.arms = args.arms or SMOKE_ARM
    levers = args.study == "levers"
    args.align_steps = args.align_steps or 150
    args.distill_steps = args.distill_steps or (100 if levers else 300)
    args.methods = args.methods or ",".join(DEFAULT_SELECTORS if levers else METHODS)
    args.variants = args.variants if args.variants is not None else ",".join(LEVER_VARIANTS if levers else VARIANTS)
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def planned_arms(args) -> list[Arm]:
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods, variants = _names(args.methods), _names(args.variants)
    if args.study == "levers":
        unknown = [m for m in [*methods, args.variant_base] if m not in SELECTORS]
        unknown += [v for v in variants if v not in LEVER_VARIANTS]
        if unknown:
            raise SystemExit(f"error: unknown selector or lever {unknown}; selectors: {', '.join(SELECTORS)}; "
                             f"levers: {', '.join(LEVER_VARIANTS)}")
        arms = lever_arms(_ints(args.seeds), ratios, methods, variants, args.variant_base)
    else:
        arms = _selection_study_arms(args, ratios, methods, variants)
    return [a for a in arms if matches(a, _names(args.arms))] if args.arms else arms


def _selection_study_arms(args, ratios, methods, variants) -> list[Arm]:
    # The goals are at 50% and 75%: those arms first, variants after, 25% last; seed-major, so a
    # deadline cuts late seeds of every method rather than every seed of the last method.
    main = sorted(selection_arms(_ints(args.seeds), [r for r in ratios if r >= 0.5], methods), key=lambda a: a.seed)
    var = sorted(variant_arms(_ints(args.variant_seeds), variants), key=lambda a: a.seed)
    low = sorted(selection_arms(_ints(args.seeds), [r for r in ratios if r < 0.5], methods), key=lambda a: a.seed)
    return main + var + low


def use_naive_gdn_on_cuda() -> None:
    """Route the CUDA dispatch of factory.ops.gated_delta_rule, and the GDN output norm, to the
    pure-torch reference. The package binds fla's entry points when it is imported, so they are
    replaced there (replacing the backend module in sys.modules after that import changes nothing:
    the first GPU run of this study compiled and ran fla's kernels in every arm)."""
    import factory.ops.gated_delta_rule as gdr
    from factory.layers.gdn import GatedRMSNorm
    from factory.ops.gated_delta_rule import naive

    gdr.fla_chunk = naive.naive_chunk_gated_delta_rule
    gdr.fla_recurrent = naive.naive_recurrent_gated_delta_rule
    gdr.fla_conv = naive.naive_causal_conv1d
    GatedRMSNorm.fused_on_cuda = False


EVAL_SEED = 1234  # the same retrieval samples for every arm and for the teacher


def run_arm(arm: Arm, budget: Budget, out_root: str, extra: list[str], gdn_kernel: str, teacher: dict) -> dict:
    """One arm's pipeline, its evaluation, and its summary against the teacher's evaluation (recall
    kept per task at the training length, KL, held-out loss gap)."""
    _one_thread(gdn_kernel)
    from factory.pipeline import run_pipeline

    cfg, yaml = arm_config(arm, budget, Path(out_root), extra)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(root.parent / f"{arm.name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        run_pipeline(cfg, yaml)
        evaluation = evaluate(cfg, next(root.glob(f"*-{training_stage(cfg)}")) / "model")
    return {**collect(root, arm, evaluation, time.perf_counter() - started), "summary": summarize(evaluation, teacher)}


def _one_thread(gdn_kernel: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                      HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    import torch

    torch.set_num_threads(1)
    if gdn_kernel == "naive":
        use_naive_gdn_on_cuda()


def evaluate(cfg, student_dir: Path | None) -> dict:
    """Held-out loss and KL to the teacher, and retrieval by distance, of the student (of the
    teacher itself when ``student_dir`` is None), on retrieval samples fixed by ``EVAL_SEED``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.data.packing import packed_rows
    from factory.eval.heldout import heldout_metrics
    from factory.eval.retrieval import retrieval_accuracy
    from factory.models.hqwen3 import HQwen3ForCausalLM

    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    load = dict(dtype=torch.float32, attn_implementation=cfg.model.attn_implementation)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.path, **load).to(device).eval()
    model = HQwen3ForCausalLM.from_pretrained(student_dir, **load).to(device).eval() if student_dir else teacher
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    e = cfg.eval
    with torch.no_grad():
        rows = packed_rows(cfg.data.heldout_files, tokenizer, cfg.data.seq_len, cfg.data.text_field, cfg.data.cache_dir)
        heldout = heldout_metrics(teacher, model, rows, e.heldout_rows, e.batch_size, device)
        ret = retrieval_accuracy(model, tokenizer, e.retrieval_distances, e.retrieval_samples, seed=EVAL_SEED,
                                 device=device)
    return {"heldout": heldout, "retrieval": ret, "train_seq_len": cfg.data.seq_len}


def evaluate_teacher(arm: Arm, budget: Budget, out_root: str, extra: list[str]) -> dict:
    _one_thread("auto")
    cfg, _ = arm_config(arm, budget, Path(out_root), extra)
    return evaluate(cfg, None)


def collect(root: Path, arm: Arm, evaluation: dict, wall: float) -> dict:
    stages = {}
    for path in sorted(root.glob("*/stage.json")):
        meta = json.loads(path.read_text())
        stages[meta["stage"]] = {k: meta[k] for k in ("seconds", "tokens", "steps", "final_loss", "selection_tokens")
                                 if k in meta}
    selection = json.loads(next(root.glob("*-select/selection.json")).read_text())
    keep = ("gdn_layers", "scores", "score_label", "calibration_tokens", "compute_tokens", "backward_tokens",
            "compute_flops", "seconds", "priming_flops", "share_of_priming", "score_parts", "restore_rounds")
    return {**asdict(arm), "wall_s": round(wall, 1), "stages": stages, "eval": evaluation,
            "selection": {**{k: selection.get(k) for k in keep}, "share_of_recipe_priming": recipe_share(arm, selection)}}


def recipe_share(arm: Arm, selection: dict) -> float:
    """Selection FLOPs over the training stages' FLOPs of the shipped recipe (same formula)."""
    from factory.priming.select import priming_flops

    units = 2 * selection["compute_tokens"] + 4 * selection["backward_tokens"]
    if not units:
        return 0.0
    params = selection["compute_flops"] / units
    return selection["compute_flops"] / priming_flops(recipe_config(arm), params)


def prewarm_cache(budget: Budget, out_root: Path, extra: list[str]) -> Arm:
    """Pack the datasets once, so parallel arms only read the cache; returns the plain arm used (no
    variant overrides: a setting not merged yet must fail its own arm, not the whole run)."""
    from transformers import AutoTokenizer

    from factory.data.packing import packed_rows

    arm = Arm("prewarm", "selection", "alternate", 0.5, 0)
    cfg, _ = arm_config(arm, budget, out_root, extra)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    for files in (cfg.data.train_files, cfg.data.heldout_files):
        packed_rows(files, tokenizer, cfg.data.seq_len, cfg.data.text_field, cfg.data.cache_dir)
    return arm


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def budget_of(args) -> Budget:
    distances = LEVER_DISTANCES if args.study == "levers" else DISTANCES
    if args.smoke:
        distances = (64, 480)
    return Budget(args.align_steps, args.distill_steps, args.batch, args.retrieval_samples, args.heldout_rows,
                  args.device, args.precision, distances)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = budget_of(args)
    results = json.loads(args.results.read_text()) if args.results.exists() else {"arms": {}}
    results.update(study=args.study, budget=asdict(budget))
    todo = [a for a in planned_arms(args) if a.name not in results["arms"]]
    print(f"{len(todo)} arms to run ({len(results['arms'])} already done), {args.workers} workers", flush=True)
    if not todo:
        return
    plain = prewarm_cache(budget, args.out, args.set)
    if "teacher" not in results:
        results["teacher"] = evaluate_teacher(plain, budget, str(args.out), args.set)
        save(results, args.results)
    start_by = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    work = partial(run_arm, budget=budget, out_root=str(args.out), extra=args.set, gdn_kernel=args.gdn_kernel,
                   teacher=results["teacher"])
    skipped = run_arms(todo, work, args.workers, results, lambda: save(results, args.results),
                       deadline=args.deadline_at or float("inf"), start_by=start_by, estimate_s=args.arm_estimate_s)
    print(f"not run (deadline): {[a.name for a in skipped]}" if skipped else "all arms ran", flush=True)


if __name__ == "__main__":
    main()
