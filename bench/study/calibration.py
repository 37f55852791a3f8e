"""Selection cost and stability: per-layer damage of swa_proxy / gdn_proxy on the embedded teacher for
growing calibration sets and several calibration seeds (kl_trained once), the chosen layers at
25/50/75%, and the selection's share of the shipped recipe's priming compute (all its training
stages, same FLOP formula).

    python bench/study/calibration.py --out bench/study/calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import Arm, recipe_config  # noqa: E402

SIZES = ((4, 4), (8, 8), (16, 16))  # (held-out rows, retrieval samples)


def scores(method: str, rows: int, samples: int, seed: int, window: int, teacher, tokenizer, cfg) -> dict:
    """One scoring pass; the one-shot choice at each ratio is the least damaged layers."""
    from dataclasses import replace

    from factory.priming.scoring import ScoringInputs
    from factory.priming.select import add_priming_share, num_gdn_layers, select_layers

    inputs = ScoringInputs(teacher, tokenizer, cfg.data, cfg.init, seed, "cpu", None)
    sel_cfg = replace(cfg.select, method=method, window=window, calibration_rows=rows, calibration_samples=samples)
    n = teacher.config.num_hidden_layers
    sel = add_priming_share(select_layers(sel_cfg, n, inputs), cfg, sum(p.numel() for p in teacher.parameters()))
    ranked = sorted(range(n), key=lambda i: (sel.scores[i], i))
    chosen = {str(r): sorted(ranked[:num_gdn_layers(r, n)]) for r in (0.25, 0.5, 0.75)}
    return {"method": method, "rows": rows, "samples": samples, "seed": seed, "window": window, "scores": sel.scores,
            "parts": sel.score_parts, "chosen": chosen, "share_of_recipe_priming": sel.share_of_priming,
            "calibration_tokens": sel.calibration_tokens, "seconds": sel.seconds}


def main(argv=None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("calibration.json"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="swa_proxy,gdn_proxy,kl_trained")
    p.add_argument("--windows", default="64")
    p.add_argument("--teacher", type=Path, help="default: the recipe's model.path")
    p.add_argument("--data", type=Path, help="a folder with train.jsonl and heldout.jsonl (default: the recipe's)")
    p.add_argument("--trained-steps", type=int, default=10, help="kl_trained: steps per layer (the study's)")
    p.add_argument("--trained-batch", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = recipe_config(Arm("x", "selection", "swa_proxy", 0.5, 0))
    if args.teacher:
        cfg.model.path = str(args.teacher)
    if args.data:
        cfg.data.train_files, cfg.data.heldout_files = [str(args.data / "train.jsonl")], [str(args.data / "heldout.jsonl")]
    cfg.select.trained_steps, cfg.select.trained_batch_size = args.trained_steps, args.trained_batch
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    results = []
    for method in args.methods.split(","):
        for window in map(int, args.windows.split(",")):
            # The costly baseline once, at the default size.
            sizes = SIZES if method != "kl_trained" else ((8, 8),)
            for rows, samples in sizes:
                for seed in map(int, args.seeds.split(",")) if method != "kl_trained" else (0,):
                    started = time.perf_counter()
                    results.append(scores(method, rows, samples, seed, window, teacher, tokenizer, cfg))
                    r = results[-1]
                    print(f"{method} w={window} rows={rows} samples={samples} seed={seed}: 50% -> {r['chosen']['0.5']}, "
                          f"75% -> {r['chosen']['0.75']}, share {100 * r['share_of_recipe_priming']:.2f}% "
                          f"({time.perf_counter() - started:.0f}s)", flush=True)
                    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
