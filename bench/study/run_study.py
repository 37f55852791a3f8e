"""Run the study's arms (bench/study/grid.py) and gather their results into one JSON file.

Each arm is one ``factory.pipeline.run_pipeline`` call in a fresh process (one thread each),
``--workers`` at a time; results are merged into ``--results`` as arms finish, so a cut-short
run keeps what it finished, and a rerun skips arms already there.

    python bench/study/run_study.py --results bench/study/results.json --workers 1      # CPU
    python bench/study/run_study.py --workers 8 --gdn-kernel naive ...                   # one GPU
    python bench/study/report.py bench/study/results.json                               # tables, plots

``--gdn-kernel naive`` runs the pure-torch GDN reference on CUDA too (no Triton compile per
process); the math is the one the CPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import VARIANTS, Arm, Budget, arm_config, recipe_config, selection_arms, variant_arms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/study"), help="pipeline directories")
    p.add_argument("--results", type=Path, default=Path("/tmp/study/results.json"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant-seeds", default="0,1,2")
    p.add_argument("--ratios", default="0.25,0.5,0.75")
    p.add_argument("--methods", default="alternate,swa_proxy,gdn_proxy,kl_trained")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--align-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--retrieval-samples", type=int, default=64)
    p.add_argument("--heldout-rows", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--gdn-kernel", choices=("auto", "naive"), default="auto")
    p.add_argument("--max-minutes", type=float, default=0, help="start no arm after this (0: no limit)")
    p.add_argument("--set", action="append", default=[], help="extra config override for every arm")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def planned_arms(args) -> list[Arm]:
    ratios = [float(r) for r in args.ratios.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    # The goals are at 50% and 75%: those arms first, variants after, 25% last; seed-major, so a
    # deadline cuts late seeds of every method rather than every seed of the last method.
    main = sorted(selection_arms(_ints(args.seeds), [r for r in ratios if r >= 0.5], methods), key=lambda a: a.seed)
    variants = sorted(variant_arms(_ints(args.variant_seeds), [v for v in args.variants.split(",") if v]),
                      key=lambda a: a.seed)
    # 25% seed-major: if the time limit cuts it, every method still has its first seeds.
    low = sorted(selection_arms(_ints(args.seeds), [r for r in ratios if r < 0.5], methods), key=lambda a: a.seed)
    return main + variants + low


def use_naive_gdn_on_cuda() -> None:
    """Route the CUDA dispatch of factory.ops.gated_delta_rule to the pure-torch reference."""
    import types

    from factory.ops.gated_delta_rule import naive

    module = types.ModuleType("factory.ops.gated_delta_rule.fla_backend")
    module.fla_chunk = naive.naive_chunk_gated_delta_rule
    module.fla_recurrent = naive.naive_recurrent_gated_delta_rule
    module.fla_conv = naive.naive_causal_conv1d
    sys.modules[module.__name__] = module


EVAL_SEED = 1234  # the same retrieval samples for every arm and for the teacher


def run_arm(arm: Arm, budget: Budget, out_root: str, extra: list[str], gdn_kernel: str) -> dict:
    _one_thread(gdn_kernel)
    from factory.pipeline import run_pipeline

    cfg, yaml = arm_config(arm, budget, Path(out_root), extra)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(root.parent / f"{arm.name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        run_pipeline(cfg, yaml)
        evaluation = evaluate(cfg, next(root.glob("*-distill")) / "model")
    return collect(root, arm, evaluation, time.perf_counter() - started)


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
    return {"heldout": heldout, "retrieval": ret}


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
            "compute_flops", "seconds", "priming_flops", "share_of_priming", "score_parts")
    return {**asdict(arm), "wall_s": round(wall, 1), "stages": stages, "eval": evaluation,
            "selection": {**{k: selection.get(k) for k in keep}, "share_of_recipe_priming": recipe_share(arm, selection)}}


def recipe_share(arm: Arm, selection: dict) -> float:
    """Selection FLOPs over the align + distill FLOPs of the shipped recipe (same formula)."""
    from factory.priming.select import priming_flops

    units = 2 * selection["compute_tokens"] + 4 * selection["backward_tokens"]
    if not units:
        return 0.0
    params = selection["compute_flops"] / units
    return selection["compute_flops"] / priming_flops(recipe_config(arm), params)


def prewarm_cache(arm: Arm, budget: Budget, out_root: Path, extra: list[str]) -> None:
    """Pack the datasets once, so parallel arms only read the cache."""
    from transformers import AutoTokenizer

    from factory.data.packing import packed_rows

    cfg, _ = arm_config(arm, budget, out_root, extra)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    for files in (cfg.data.train_files, cfg.data.heldout_files):
        packed_rows(files, tokenizer, cfg.data.seq_len, cfg.data.text_field, cfg.data.cache_dir)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = Budget(args.align_steps, args.distill_steps, args.batch, args.retrieval_samples, args.heldout_rows,
                    args.device, args.precision)
    results = json.loads(args.results.read_text()) if args.results.exists() else {"arms": {}}
    results["budget"] = asdict(budget)
    todo = [a for a in planned_arms(args) if a.name not in results["arms"]]
    print(f"{len(todo)} arms to run ({len(results['arms'])} already done), {args.workers} workers", flush=True)
    if not todo:
        return
    prewarm_cache(todo[0], budget, args.out, args.set)
    if "teacher" not in results:
        results["teacher"] = evaluate_teacher(todo[0], budget, str(args.out), args.set)
        save(results, args.results)
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else float("inf")
    started = time.time()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        pending, queue = {}, list(todo)
        while queue or pending:
            while queue and len(pending) < args.workers and time.time() < deadline:
                arm = queue.pop(0)
                pending[pool.submit(run_arm, arm, budget, str(args.out), args.set, args.gdn_kernel)] = arm
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                arm = pending.pop(future)
                try:
                    results["arms"][arm.name] = future.result()
                    print(f"[{time.time() - started:6.0f}s] {arm.name}: {results['arms'][arm.name]['wall_s']}s",
                          flush=True)
                except Exception as err:  # one failed arm must not lose the others
                    print(f"[{time.time() - started:6.0f}s] {arm.name} FAILED: {type(err).__name__}: {err}", flush=True)
                save(results, args.results)
    print(f"skipped (deadline): {[a.name for a in queue]}" if queue else "all arms ran", flush=True)


if __name__ == "__main__":
    main()
