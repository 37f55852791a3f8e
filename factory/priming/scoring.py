"""Per-layer damage scores for selection (DESIGN.md "Priming").

Each candidate layer is replaced, alone, and the model is run over a small calibration set;
the damage is measured only where the replacement can matter: text positions at least
``min_distance`` tokens into their document, and the answer tokens of retrieval samples whose
fact sits beyond the window (or, when ``calibration_files`` hold ``{"prompt", "answer"}`` recall
items, the answer tokens of those items instead of synthetic ones). Damage is forward KL to the
teacher's logits (``metric=kl``) or the increase of next-token loss (``metric=loss``); lower damage = safer to convert.

Replacements:
- ``swa``: the layer's attention sees only the last ``window`` tokens (an extra mask put on
  that layer by a forward pre-hook; the model code is untouched).
- ``gdn``: the layer's attention-initialized GDN (a probe hybrid whose layers all hold both
  mixers; each layer's ``mixer_mode`` picks which one runs). The probe shares the teacher's
  tensors, and a layer's GDN is built only while that layer is replaced.
- ``kl_trained``: a hybrid with only that layer converted, distilled for a few steps.
(``kl_restore``, in ``factory.priming.restore``, works the other way: all layers converted, attention
restored one layer at a time.)

One recording pass keeps every layer's input; scoring layer i replays the unchanged layers
below it from that recording and runs only layers i..L-1, so a one-shot scoring costs about
``1 + (L + 1) / 2`` forward passes instead of ``1 + L``. Compute is counted in tokens through
forward (full-forward equivalents) and backward passes; FLOPs use
``2 * N * forward tokens + 4 * N * backward tokens`` with N the teacher's parameter count.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from factory.config.schema import DataConfig, InitConfig, OptimConfig, SelectConfig
from factory.data.packing import IGNORE_INDEX, model_inputs, packed_rows
from factory.distill.losses import forward_kl, tiled_kl_loss
from factory.data.recall_items import read_recall_file, split_calibration_files
from factory.data.synthetic import DEFAULT_FILLER, Filler, encode_sample, make_samples, token_counter
from factory.models.hqwen3 import HQwen3ForCausalLM
from factory.priming.init import build_hybrid_from_teacher, hybrid_config, init_gdn_from_attention, layer_generator
from factory.train.engine import LocalEngine
from factory.train.loop import train_loop

FLOPS_FORMULA = ("FLOPs = 2*N*forward_tokens + 4*N*backward_tokens, N = teacher parameters (embeddings included); "
                 "a pass that replays layers below i counts (L-i)/L of a forward")
METRICS = ("kl", "loss")


@dataclass
class ScoringInputs:
    """What scoring needs besides the select config: the frozen teacher and where data lives."""

    teacher: torch.nn.Module
    tokenizer: object
    data: DataConfig
    init: InitConfig
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None


@dataclass
class CalibrationPart:
    """Rows and their scored positions (label != IGNORE_INDEX: the token the position predicts)."""

    name: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    weight: float

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def scored(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Compute:
    forward_tokens: float = 0.0  # in full-forward equivalents (a pass from layer i counts (L - i) / L)
    backward_tokens: int = 0

    def flops(self, params: int) -> float:
        return 2.0 * params * self.forward_tokens + 4.0 * params * self.backward_tokens


@dataclass
class ScoreResult:
    damage: list[float]  # per layer, one-shot (every layer alone)
    chosen: list[int]
    rounds: list[dict] = field(default_factory=list)  # greedy: {layer: damage} per round
    parts: list[dict] = field(default_factory=list)  # per layer: damage of each calibration part
    calibration: dict = field(default_factory=dict)
    compute: Compute = field(default_factory=Compute)


# ------------------------------------------------------------------ calibration


def build_calibration(cfg: SelectConfig, inputs: ScoringInputs) -> list[CalibrationPart]:
    seq_len = cfg.calibration_seq_len or inputs.data.seq_len
    min_distance = cfg.window if cfg.min_distance is None else cfg.min_distance
    parts = []
    if cfg.answer_weight < 1 and cfg.calibration_rows > 0:
        parts.append(_text_part(cfg, inputs, seq_len, min_distance))
    if cfg.answer_weight > 0 and (cfg.calibration_samples > 0 or split_calibration_files(cfg.calibration_files)[1]):
        parts.append(_answer_part(cfg, inputs, seq_len))
    if not parts:
        raise ValueError("select: the calibration set is empty; set select.calibration_rows or "
                         "select.calibration_samples > 0")
    return parts


def _text_files(cfg: SelectConfig, inputs: ScoringInputs) -> list[str]:
    """Text calibration files: those of ``calibration_files`` in the text format, else the held-out files."""
    return split_calibration_files(cfg.calibration_files)[0] or list(inputs.data.heldout_files)


def _text_part(cfg: SelectConfig, inputs: ScoringInputs, seq_len: int, min_distance: int) -> CalibrationPart:
    files = _text_files(cfg, inputs)
    rows = packed_rows(files, inputs.tokenizer, seq_len, inputs.data.text_field, inputs.cache_dir)
    # Evenly spread rows: the held-out file is in document order.
    index = torch.from_numpy(np.linspace(0, len(rows) - 1, min(cfg.calibration_rows, len(rows))).round().astype(int))
    batch = rows.batch(index)
    labels = batch["labels"].masked_fill(batch["position_ids"] < min_distance, IGNORE_INDEX)
    return CalibrationPart("text", batch["input_ids"], batch["position_ids"], labels, 1 - cfg.answer_weight)


def _answer_part(cfg: SelectConfig, inputs: ScoringInputs, seq_len: int) -> CalibrationPart:
    """The user's recall items when ``calibration_files`` hold some (every item: the user chose them),
    else synthetic retrieval samples (half kv, half passkey) whose fact is beyond the window; the
    answer tokens are scored."""
    tok = inputs.tokenizer
    recall_files = split_calibration_files(cfg.calibration_files)[1]
    if recall_files:
        items = [item for f in recall_files for item in read_recall_file(f, "select.calibration_files")]
        return _answer_rows([encode_sample(tok, item) for item in items], tok, cfg.answer_weight)
    filler = Filler(DEFAULT_FILLER.read_text(), token_counter(tok))
    # Room for the prefix (<= 64 tokens), the fact and the question within seq_len; beyond the
    # window where it fits.
    high = max(16, seq_len - 112)
    low = min(cfg.window + 16, high)
    distances = np.linspace(low, high, cfg.calibration_samples).round().astype(int)
    rng = random.Random(f"select-calibration/{inputs.seed}")
    encoded = [encode_sample(tok, make_samples(("kv", "passkey")[i % 2], rng, filler, int(d), 1)[0])
               for i, d in enumerate(distances)]
    return _answer_rows(encoded, tok, cfg.answer_weight)


def _answer_rows(encoded: list[tuple[list[int], int]], tok, weight: float) -> CalibrationPart:
    """Right-padded rows of (token ids, answer length) with only the answer tokens scored."""
    width = max(len(ids) for ids, _ in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (ids, n_answer) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        start = len(ids) - n_answer
        labels[row, start - 1 : len(ids) - 1] = torch.tensor(ids[start:])
    # Right padding under a causal model: real tokens never see it.
    position_ids = torch.arange(width).expand(len(encoded), width).clone()
    return CalibrationPart("answers", input_ids, position_ids, labels, weight)


def calibration_summary(parts: list[CalibrationPart], cfg: SelectConfig, inputs: ScoringInputs) -> dict:
    return {"tokens": sum(p.tokens for p in parts), "window": cfg.window, "metric": cfg.metric,
            "min_distance": cfg.window if cfg.min_distance is None else cfg.min_distance,
            "files": _text_files(cfg, inputs),
            "answers": split_calibration_files(cfg.calibration_files)[1] or "synthetic kv and passkey",
            "parts": {p.name: {"rows": p.input_ids.shape[0], "seq_len": p.input_ids.shape[1], "tokens": p.tokens,
                               "scored_positions": p.scored, "weight": p.weight} for p in parts}}


# ------------------------------------------------------------------ damage


def _batches(part: CalibrationPart, batch_size: int, device):
    for start in range(0, part.input_ids.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        yield (part.input_ids[sl].to(device), part.position_ids[sl].to(device), part.labels[sl].to(device))


@dataclass
class Recording:
    """One pass of a model over the calibration set: every layer's input (per part, per batch),
    and the final hidden states at the scored positions (logits are recomputed per use: a
    hidden state is D numbers, a logit row V)."""

    layer_inputs: list[list[list[torch.Tensor]]]
    final: list[list[torch.Tensor]]


@torch.no_grad()
def record(model, parts: list[CalibrationPart], batch_size: int, device, compute: Compute) -> Recording:
    seen: list[torch.Tensor] = []

    def keep_input(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in model.model.layers]
    inputs, final = [], []
    try:
        for part in parts:
            inputs.append([]), final.append([])
            for ids, pos, y in _batches(part, batch_size, device):
                seen.clear()
                hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                inputs[-1].append(list(seen))
                final[-1].append(hidden[y != IGNORE_INDEX])
                compute.forward_tokens += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return Recording(inputs, final)


class _Replay(torch.nn.Module):
    """Stands in for the unchanged layers below the replaced one: returns their recorded output."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


@contextmanager
def _replayed_below(model, start: int):
    """Layers ``< start`` replaced by one ``_Replay`` for the duration; yields it."""
    layers = model.model.layers
    saved, replay = [layers[j] for j in range(start)], _Replay()
    for j in range(start):
        layers[j] = replay
    try:
        yield replay
    finally:
        for j, layer in enumerate(saved):
            layers[j] = layer


@torch.no_grad()
def damage(model, teacher, parts: list[CalibrationPart], rec: Recording, metric: str, batch_size: int,
           device, compute: Compute, start: int = 0) -> tuple[float, dict]:
    """Weighted mean over calibration parts of the per-position damage; also each part's value.
    Layers below ``start`` are unchanged: their recorded output is replayed, not recomputed (a pass
    from layer ``start`` counts ``(L - start) / L`` of a full forward)."""
    per_part, n_layers = {}, len(model.model.layers)
    with _replayed_below(model, start) as replay:
        for index, part in enumerate(parts):
            total, count = 0.0, 0
            for (ids, pos, y), h_t, h_in in zip(_batches(part, batch_size, device), rec.final[index],
                                                rec.layer_inputs[index]):
                valid = y != IGNORE_INDEX
                replay.hidden = h_in[start] if start else None
                h_s = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[valid]
                total += _position_damage(model.lm_head(h_s), teacher.lm_head(h_t), y[valid], metric)
                count += int(valid.sum())
                compute.forward_tokens += ids.numel() * (n_layers - start) / n_layers
            per_part[part.name] = total / max(1, count)
    weight = sum(p.weight for p in parts)
    return sum(p.weight * per_part[p.name] for p in parts) / weight, per_part


def _position_damage(logits_s, logits_t, labels, metric: str) -> float:
    logp_s, logp_t = F.log_softmax(logits_s.float(), -1), F.log_softmax(logits_t.float(), -1)
    if metric == "kl":
        return float(forward_kl(logp_s, logp_t, log_probs=True))
    return float(F.nll_loss(logp_s, labels, reduction="sum") - F.nll_loss(logp_t, labels, reduction="sum"))


# ------------------------------------------------------------------ replacements


def sliding_window_mask(position_ids: torch.Tensor, window: int, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """Causal, block-diagonal per document (positions restart at document starts), and at most
    ``window`` tokens back (the query's own token included). ``[B, 1, T, T]``."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    doc = starts.cumsum(-1)
    idx = torch.arange(position_ids.shape[-1], device=position_ids.device)
    back = idx[:, None] - idx[None, :]
    allowed = (back >= 0) & (back < window) & (doc[:, :, None] == doc[:, None, :])
    if not additive:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _swa_hook(window: int):
    def hook(module, args, kwargs):
        if module.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"swa_proxy needs sdpa or eager attention, not {module.config._attn_implementation!r}")
        hidden = kwargs["hidden_states"]
        position_ids = kwargs["position_ids"].expand(hidden.shape[0], -1)
        kwargs["attention_mask"] = sliding_window_mask(position_ids, window, hidden.dtype,
                                                       module.config._attn_implementation == "eager")
        return args, kwargs

    return hook


def replace_layer(probe, layer: int, kind: str, window: int) -> Callable[[], None]:
    """Put the replacement on one layer of the probe; returns the undo."""
    decoder = probe.model.layers[layer]
    if kind == "gdn":
        materialize_gdn(probe, layer)
        decoder.mixer_mode = "student"

        def undo():
            decoder.mixer_mode = "teacher"
            decoder.linear_attn.to("meta")  # freed; made again identically (per-layer RNG) if needed

        return undo
    handle = decoder.self_attn.register_forward_pre_hook(_swa_hook(window), with_kwargs=True)
    return handle.remove


@torch.no_grad()
def materialize_gdn(probe, layer: int) -> None:
    """The layer's GDN, initialized from its attention exactly as the init stage will do it."""
    decoder = probe.model.layers[layer]
    weight = decoder.self_attn.q_proj.weight
    decoder.linear_attn.to_empty(device=weight.device).to(weight.dtype)
    init, seed = probe.gdn_init
    init_gdn_from_attention(decoder.linear_attn, decoder.self_attn, init, layer_generator(seed, layer))


def build_probe(teacher, kind: str, init: InitConfig, seed: int):
    """The teacher's network in which every layer can be switched to its replacement. It holds the
    teacher's own tensors, not a copy; a layer's GDN exists only while that layer is replaced, so
    scoring costs one GDN layer of memory beyond the teacher (a 32B teacher is 65 GB in bf16)."""
    n = teacher.config.num_hidden_layers
    types = ["linear_attention" if kind == "gdn" else "full_attention"] * n
    with torch.device("meta"):
        probe = HQwen3ForCausalLM(hybrid_config(teacher.config, types, init, keep_teacher_attention=True))
    missing, unexpected = probe.load_state_dict(teacher.state_dict(), strict=False, assign=True)
    if unexpected or any(".linear_attn." not in key for key in missing):
        raise RuntimeError(f"teacher and probe disagree: {sorted(unexpected)[:4]} {sorted(missing)[:4]}")
    if probe.config.tie_word_embeddings:
        probe.lm_head.weight = probe.model.embed_tokens.weight
    device = next(teacher.parameters()).device
    # Its table is a non-persistent buffer, absent from the state dict: built anew.
    probe.model.rotary_emb = type(probe.model.rotary_emb)(config=probe.config).to(device)
    probe.config._attn_implementation = "sdpa" if kind == "swa" else teacher.config._attn_implementation
    probe.gdn_init = (init, seed)
    probe.eval().requires_grad_(False)
    for layer in probe.model.layers:
        layer.mixer_mode = "teacher"
    return probe


# ------------------------------------------------------------------ proxies


def _ranked(scores: dict[int, float]) -> list[int]:
    return sorted(scores, key=lambda i: (scores[i], i))


def score_proxy(cfg: SelectConfig, inputs: ScoringInputs, kind: str, n_gdn: int) -> ScoreResult:
    """One-shot (every layer alone) scores; with ``cfg.greedy``, rounds that fix the best layer.
    The probe with nothing replaced is the teacher: its recording is the reference."""
    parts = build_calibration(cfg, inputs)
    compute, bs, dev, teacher = Compute(), cfg.calibration_batch_size, inputs.device, inputs.teacher
    probe = build_probe(teacher, kind, inputs.init, inputs.seed)
    reference = current = record(probe, parts, bs, dev, compute)
    fixed, undo_fixed, rounds, part_scores = [], [], [], []
    for round_index in range(n_gdn if cfg.greedy else 1):
        if fixed:  # layers above the fixed ones now see their replacement: record again
            current = record(probe, parts, bs, dev, compute)
        scores = {}
        for layer in range(teacher.config.num_hidden_layers):
            if layer in fixed:
                continue
            undo = replace_layer(probe, layer, kind, cfg.window)
            scores[layer], per_part = damage(probe, teacher, parts, against_reference(current, reference), cfg.metric, bs,
                                             dev, compute, start=layer)
            undo()
            if round_index == 0:
                part_scores.append(per_part)
        rounds.append(scores)
        fixed.append(_ranked(scores)[0])
        undo_fixed.append(replace_layer(probe, fixed[-1], kind, cfg.window))
    for undo in undo_fixed:
        undo()
    one_shot = rounds[0]
    chosen = fixed if cfg.greedy else _ranked(one_shot)[:n_gdn]
    return ScoreResult([one_shot[i] for i in sorted(one_shot)], sorted(chosen),
                       [{str(k): v for k, v in r.items()} for r in rounds], part_scores,
                       calibration_summary(parts, cfg, inputs), compute)


def against_reference(current: Recording, reference: Recording) -> Recording:
    """Layer inputs of the current probe, damage always against the teacher's output."""
    return Recording(current.layer_inputs, reference.final)


# ------------------------------------------------------------------ trained scoring (kl_trained, kl_restore)


class TrainingRows:
    """Training rows in one seeded order: every kl_trained candidate starts at the same rows;
    kl_restore reads on through its rounds."""

    def __init__(self, rows, batch_size: int, seed: int):
        self.rows, self.batch_size, self.step = rows, batch_size, 0
        self.order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))

    def next_batch(self) -> dict:
        index = self.order[(torch.arange(self.batch_size) + self.step * self.batch_size) % len(self.rows)]
        self.step += 1
        return self.rows.batch(index)


def distill_gdn(model, teacher, named: list, cfg: SelectConfig, steps: int, rows: TrainingRows,
                compute: Compute, device) -> None:
    """Distil the ``named`` parameters of ``model`` to ``teacher`` for ``steps`` steps through the training
    stages' loop and engine (AdamW, constant LR ``cfg.trained_lr``, clipped at 1) and their tiled forward KL;
    they are frozen again afterwards."""
    for _, p in named:
        p.requires_grad_(True)
    optim = OptimConfig(lr=cfg.trained_lr, weight_decay=0.0, beta1=0.9, beta2=0.95, warmup_steps=0,
                        schedule="constant", grad_clip=1.0)
    engine = LocalEngine(model, named, optim, steps, precision="fp32")

    def kl(batch):
        kwargs = model_inputs(batch)
        with torch.no_grad():
            target = teacher.model(**kwargs).last_hidden_state
        hidden = model.model(**kwargs).last_hidden_state
        tokens = batch["input_ids"].numel()
        compute.forward_tokens += 2 * tokens  # teacher + student
        compute.backward_tokens += tokens
        return tiled_kl_loss(hidden, target, model.lm_head.weight, teacher.lm_head.weight, batch["labels"]), {}

    model.train()
    train_loop(engine, rows, kl, steps, 1, [], device)
    model.eval()
    for _, p in named:
        p.requires_grad_(False)


def training_rows(cfg: SelectConfig, inputs: ScoringInputs):
    seq_len = cfg.calibration_seq_len or inputs.data.seq_len
    return packed_rows(inputs.data.train_files, inputs.tokenizer, seq_len, inputs.data.text_field, inputs.cache_dir)


def _train_one_layer(teacher, layer: int, cfg: SelectConfig, inputs: ScoringInputs, rows, compute: Compute):
    """A hybrid with only ``layer`` converted, its GDN distilled for ``cfg.trained_steps`` steps."""
    n = teacher.config.num_hidden_layers
    types = ["linear_attention" if i == layer else "full_attention" for i in range(n)]
    model = build_hybrid_from_teacher(teacher, types, inputs.init, inputs.seed, keep_teacher_attention=False)
    model = model.to(inputs.device).requires_grad_(False)
    named = list(model.model.layers[layer].linear_attn.named_parameters())
    distill_gdn(model, teacher, named, cfg, cfg.trained_steps, TrainingRows(rows, cfg.trained_batch_size, inputs.seed),
                compute, inputs.device)
    return model


def score_kl_trained(cfg: SelectConfig, inputs: ScoringInputs, n_gdn: int) -> ScoreResult:
    """The costly baseline: one short distillation per candidate layer, then the same damage."""
    if cfg.greedy:
        raise ValueError("select.greedy=true is for swa_proxy and gdn_proxy; kl_trained scores each layer once")
    parts = build_calibration(cfg, inputs)
    compute, bs, dev, teacher = Compute(), cfg.calibration_batch_size, inputs.device, inputs.teacher
    reference = record(teacher, parts, bs, dev, compute)
    rows = training_rows(cfg, inputs)
    scores, part_scores = {}, []
    for layer in range(teacher.config.num_hidden_layers):
        model = _train_one_layer(teacher, layer, cfg, inputs, rows, compute)
        # Layers below the converted one are the teacher's: replayed from its recording.
        scores[layer], per_part = damage(model, teacher, parts, reference, cfg.metric, bs, dev, compute, start=layer)
        part_scores.append(per_part)
    return ScoreResult([scores[i] for i in sorted(scores)], sorted(_ranked(scores)[:n_gdn]),
                       [{str(k): v for k, v in scores.items()}], part_scores,
                       calibration_summary(parts, cfg, inputs), compute)
