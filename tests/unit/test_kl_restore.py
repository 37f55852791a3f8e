"""select.method=kl_restore: every layer converted and briefly distilled, attention restored one layer
at a time where it lowers the damage most (factory/priming/restore.py)."""

import json

import pytest
import torch

from factory.config.schema import DataConfig, InitConfig, SelectConfig
from factory.priming import scoring
from factory.priming.restore import all_converted_student
from factory.priming.scoring import ScoringInputs
from factory.priming.select import read_selection, select_layers
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

LAYERS = 4
SEQ_LEN = 64
FAST = dict(method="kl_restore", window=8, calibration_rows=4, calibration_samples=2, trained_steps=2,
            trained_batch_size=2, restore_steps=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_assets(tmp_path_factory.mktemp("restore_assets"), num_layers=LAYERS)


def _inputs(assets, silent=()):
    """The tiny teacher; the attention of the ``silent`` layers writes nothing (output projection zero)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for i in silent:
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
    data = DataConfig(train_files=[str(assets["train"])], heldout_files=[str(assets["heldout"])], seq_len=SEQ_LEN)
    return ScoringInputs(teacher, AutoTokenizer.from_pretrained(assets["teacher"]), data, InitConfig(), seed=0,
                         cache_dir=str(assets["teacher"].parent / "cache"))


@pytest.fixture(scope="module")
def inputs(assets):
    return _inputs(assets)


@pytest.mark.parametrize("ratio, expected", [(0.25, 1), (0.75, 3)])  # 0.5: test_deterministic
def test_restores_the_ratios_number_of_layers(inputs, ratio, expected):
    sel = select_layers(SelectConfig(ratio=ratio, **FAST), LAYERS, inputs)
    assert len(sel.gdn_layers) == len(set(sel.gdn_layers)) == expected and len(sel.scores) == LAYERS
    restored = [r["restored"] for r in sel.restore_rounds]
    assert len(restored) == LAYERS - expected and sorted(restored + sel.gdn_layers) == list(range(LAYERS))
    # Each round restores the layer whose restoration left the least damage, among those still GDN.
    for r in sel.restore_rounds:
        assert r["damage"][str(r["restored"])] == min(r["damage"].values())
    assert [r["retrained_steps"] for r in sel.restore_rounds] == [1] * (len(restored) - 1) + [0]


def test_deterministic(inputs):
    first, second = (select_layers(SelectConfig(ratio=0.5, **FAST), LAYERS, inputs) for _ in range(2))
    assert len(first.gdn_layers) == 2 and len(first.restore_rounds) == 2
    assert first.gdn_layers == second.gdn_layers and first.restore_rounds == second.restore_rounds
    assert first.scores == second.scores


def test_the_one_layer_that_mixes_tokens_is_restored_first(assets):
    """Only layer 2's attention writes anything: restoring it removes nearly all the damage."""
    crucial = _inputs(assets, silent=(0, 1, 3))
    sel = select_layers(SelectConfig(ratio=0.75, **FAST), LAYERS, crucial)
    assert sel.gdn_layers == [0, 1, 3] and sel.restore_rounds[0]["restored"] == 2
    # Scores: the drop of damage when a layer alone is restored; the silent layers' trained GDNs may
    # drift a little from silence, far less than layer 2's stands in for its attention.
    assert sel.scores[2] > 0 and all(abs(sel.scores[i]) < sel.scores[2] / 4 for i in (0, 1, 3))
    # Not with metric=loss: on a random teacher a GDN can lower the loss, so loss damage has either sign.
    half = select_layers(SelectConfig(ratio=0.5, **FAST), LAYERS, crucial)
    assert half.restore_rounds[0]["restored"] == 2 and 2 not in half.gdn_layers


def test_student_is_init_s_hybrid_sharing_the_teacher(inputs):
    """The all-GDN student holds the teacher's own tensors and the GDN weights init gives them."""
    from factory.priming.init import build_hybrid_from_teacher

    student = all_converted_student(inputs)
    ours = student.state_dict()
    for name, tensor in inputs.teacher.state_dict().items():
        assert ours[name].data_ptr() == tensor.data_ptr(), name
    whole = build_hybrid_from_teacher(inputs.teacher, ["linear_attention"] * LAYERS, inputs.init, 0).state_dict()
    gdn = {n: t for n, t in ours.items() if ".linear_attn." in n}
    assert len(gdn) == len([n for n in whole if ".linear_attn." in n])
    for name, tensor in gdn.items():
        assert torch.equal(tensor, whole[name]), name


def test_compute_accounting_and_training_steps(inputs, monkeypatch):
    calls = []
    real = scoring.train_loop

    def counted(engine, loader, loss_fn, steps, *args, **kwargs):
        calls.append((type(engine).__name__, steps))
        return real(engine, loader, loss_fn, steps, *args, **kwargs)

    monkeypatch.setattr(scoring, "train_loop", counted)
    sel = select_layers(SelectConfig(ratio=0.25, **{**FAST, "restore_steps": 2}), LAYERS, inputs)
    assert calls == [("LocalEngine", 2), ("LocalEngine", 2), ("LocalEngine", 2)]  # once, then after rounds 1, 2
    train_tokens = (2 + 2 + 2) * FAST["trained_batch_size"] * SEQ_LEN
    assert sel.backward_tokens == train_tokens
    # Teacher recording; per round a recording, the damage before (last layer only) and each candidate
    # from its own depth up.
    calib, passes, converted = sel.calibration_tokens, 1.0, list(range(LAYERS))
    for r in sel.restore_rounds:
        passes += 1 + 1 / LAYERS + sum((LAYERS - i) / LAYERS for i in converted)
        converted.remove(r["restored"])
    assert sel.compute_tokens == round(calib * passes + 2 * train_tokens)
    params = sum(p.numel() for p in inputs.teacher.parameters())
    assert sel.compute_flops == pytest.approx(2 * params * (calib * passes + 2 * train_tokens) + 4 * params * train_tokens)
    no_retrain = select_layers(SelectConfig(ratio=0.5, **{**FAST, "restore_steps": 0}), LAYERS, inputs)
    assert no_retrain.backward_tokens == 2 * FAST["trained_batch_size"] * SEQ_LEN
    assert all(r["retrained_steps"] == 0 for r in no_retrain.restore_rounds)


def test_pipeline_select_stage_reports_cost(assets, tmp_path, capsys):
    from factory.config.validate import validate_static
    from factory.pipeline import run_pipeline

    cfg = tiny_pipeline_config(assets, tmp_path / "run", stages=("select", "init", "align"), steps=2)
    cfg.select = SelectConfig(ratio=0.5, **FAST)
    validate_static(cfg)
    root = run_pipeline(cfg, "")
    sel = read_selection(root / "01-select")
    assert sel.method == "kl_restore" and len(sel.gdn_layers) == 2 and len(sel.restore_rounds) == 2
    assert sel.seconds > 0 and sel.share_of_priming == pytest.approx(sel.compute_flops / sel.priming_flops)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[select] kl_restore:"))
    assert f"{sel.seconds:.1f} s" in line and f"{100 * sel.share_of_priming:.2f}% of priming" in line
    saved = json.loads((root / "01-select" / "selection.json").read_text())
    assert saved["restore_rounds"][0]["damage_before"] > 0
    init_model = json.loads((root / "02-init" / "model" / "config.json").read_text())
    assert [i for i, t in enumerate(init_model["layer_types"]) if t == "linear_attention"] == sel.gdn_layers
