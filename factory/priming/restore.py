"""``kl_restore``: KL-guided selection by restoring attention, in the direction of arXiv 2512.20569.

The student starts with every layer converted to its attention-initialized GDN (exactly as the init
stage builds it, per ``init.*``) and is distilled briefly to the teacher (``select.trained_steps``
steps of ``select.trained_batch_size`` rows, through the training stages' loop, engine and tiled
forward KL, as ``kl_trained`` trains its candidates). Then attention comes back one layer at a time:
each round measures, for every still-converted layer, the calibration damage of the student with
that layer's attention restored (KL to the teacher's logits or loss increase, on held-out text and
recall answers, weighted by ``select.answer_weight`` exactly as the proxies score), and restores the
layer that lowers it most. It stops when ``L - n_gdn`` layers are attention again; the rest are the
GDN layers.

Retraining between rounds (``select.restore_steps`` distillation steps after each restoration; 0
measures every round on the once-trained student): the GDN layers were trained to stand in for each
other in an all-GDN stack. Once a layer is attention again, the layers above it see different
inputs, and a GDN that learnt to patch an error of another converted layer is patching an error
that is gone. Without adapting them, later rounds would rank layers for a student that no longer
exists, and they decide most of the choice at 25% GDN (six of eight layers restored). A few steps
per round keep the cost bounded (``rounds - 1`` times ``restore_steps`` steps) and far below the
paper's, which trains one distillation run (about 200M tokens at 7B) per candidate layer and ranks
layers once; here a candidate costs forward passes over the calibration set only, and the greedy
rounds see how restored layers interact.

A limit of restoring one layer at a time: recall that needs two attention layers together (an
induction circuit: one layer looks one token back, the next finds the match) pays off only once
both are back, so a round can see no gain in either alone. On the embedded teacher at 50% a
layer whose restoration alone raised the damage in round one lowered it the most in round three.

Per-layer score (selection.json ``scores``, the bar chart): how much restoring that layer alone in
round one lowers the damage. Lower = safer to convert, as for the other methods; the layers chosen
in later rounds can differ from the round-one order (``restore_rounds`` holds every round).
"""

from __future__ import annotations

from factory.config.schema import SelectConfig
from factory.priming.scoring import (Compute, ScoreResult, ScoringInputs, TrainingRows, against_reference,
                                     build_calibration, build_probe, calibration_summary, damage, distill_gdn,
                                     materialize_gdn, record, training_rows)


def all_converted_student(inputs: ScoringInputs):
    """The teacher's network with every layer's GDN built as init builds it and carrying the stream; it
    shares the teacher's tensors, so a layer's attention comes back by switching its mixer."""
    student = build_probe(inputs.teacher, "gdn", inputs.init, inputs.seed)
    for index, layer in enumerate(student.model.layers):
        materialize_gdn(student, index)
        layer.mixer_mode = "student"
    return student


def gdn_parameters(student, layers) -> list:
    return [(f"model.layers.{i}.linear_attn.{name}", p) for i in layers
            for name, p in student.model.layers[i].linear_attn.named_parameters()]


def restore_round(student, inputs: ScoringInputs, cfg: SelectConfig, parts, reference, converted: list[int],
                  compute: Compute) -> tuple[dict, dict, float]:
    """Damage of the student with each converted layer's attention restored alone; also each part's
    value per layer and the damage with nothing restored. Layers below the restored one are unchanged:
    they are replayed from one recording of the current student."""
    bs, dev, teacher = cfg.calibration_batch_size, inputs.device, inputs.teacher
    current = against_reference(record(student, parts, bs, dev, compute), reference)
    last = len(student.model.layers) - 1
    # Nothing changed: replaying all but the last layer gives the current damage for 1/L of a pass.
    before, _ = damage(student, teacher, parts, current, cfg.metric, bs, dev, compute, start=last)
    scores, per_part = {}, {}
    for layer in converted:
        student.model.layers[layer].mixer_mode = "teacher"
        scores[layer], per_part[layer] = damage(student, teacher, parts, current, cfg.metric, bs, dev, compute,
                                                start=layer)
        student.model.layers[layer].mixer_mode = "student"
    return scores, per_part, before


def score_kl_restore(cfg: SelectConfig, inputs: ScoringInputs, n_gdn: int) -> ScoreResult:
    if cfg.greedy:
        raise ValueError("select.greedy=true is for swa_proxy and gdn_proxy; kl_restore restores layers in "
                         "greedy rounds already")
    parts = build_calibration(cfg, inputs)
    compute, teacher = Compute(), inputs.teacher
    n_layers = teacher.config.num_hidden_layers
    reference = record(teacher, parts, cfg.calibration_batch_size, inputs.device, compute)
    student = all_converted_student(inputs)
    rows = TrainingRows(training_rows(cfg, inputs), cfg.trained_batch_size, inputs.seed)
    distill_gdn(student, teacher, gdn_parameters(student, range(n_layers)), cfg, cfg.trained_steps, rows, compute,
                inputs.device)
    converted, rounds, first = list(range(n_layers)), [], None
    for round_index in range(n_layers - n_gdn):
        scores, per_part, before = restore_round(student, inputs, cfg, parts, reference, converted, compute)
        if round_index == 0:
            first = (scores, per_part, before)
        best = min(converted, key=lambda i: (scores[i], i))
        converted.remove(best)
        student.model.layers[best].mixer_mode = "teacher"
        retrain = cfg.restore_steps if round_index < n_layers - n_gdn - 1 else 0
        rounds.append({"restored": best, "damage_before": before, "damage": {str(k): v for k, v in scores.items()},
                       "retrained_steps": retrain})
        if retrain:  # the remaining GDN layers adapt to the attention now back below and above them
            distill_gdn(student, teacher, gdn_parameters(student, converted), cfg, retrain, rows, compute,
                        inputs.device)
    scores, per_part, before = first
    return ScoreResult([before - scores[i] for i in range(n_layers)], sorted(converted), rounds,
                       [per_part[i] for i in range(n_layers)], calibration_summary(parts, cfg, inputs), compute)
