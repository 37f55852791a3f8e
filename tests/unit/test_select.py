"""Layer selection: manual/alternate, the scoring methods, greedy refinement, compute accounting."""

import json

import pytest
import torch

from factory.config.schema import DataConfig, InitConfig, SelectConfig
from factory.priming.scoring import ScoringInputs, sliding_window_mask
from factory.priming.select import alternate_layers, read_selection, select_layers, write_selection
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

LAYERS = 4
FAST = dict(window=8, calibration_rows=4, calibration_samples=2, trained_steps=2, trained_batch_size=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_assets(tmp_path_factory.mktemp("select_assets"), num_layers=LAYERS)


def _inputs(assets, teacher=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = teacher or AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32)
    data = DataConfig(train_files=[str(assets["train"])], heldout_files=[str(assets["heldout"])], seq_len=64)
    return ScoringInputs(teacher.eval().requires_grad_(False), AutoTokenizer.from_pretrained(assets["teacher"]),
                         data, InitConfig(), seed=0)


@pytest.fixture(scope="module")
def inputs(assets):
    return _inputs(assets)


@pytest.fixture(scope="module")
def crucial_inputs(assets):
    """Only layer 2's attention contributes: every other layer's output projection is zero."""
    inputs = _inputs(assets)
    with torch.no_grad():
        for i, layer in enumerate(inputs.teacher.model.layers):
            if i != 2:
                layer.self_attn.o_proj.weight.zero_()
    return inputs


def test_alternate_and_manual_unchanged():
    assert alternate_layers(0.5, 8) == [1, 3, 5, 7]
    sel = select_layers(SelectConfig(method="manual", layers=[3, 1]), 4)
    assert sel.gdn_layers == [1, 3] and sel.layer_types()[1] == "linear_attention"


@pytest.mark.parametrize("method", ["swa_proxy", "gdn_proxy", "kl_trained"])
@pytest.mark.parametrize("ratio, expected", [(0.25, 1), (0.5, 2), (0.75, 3)])
def test_methods_choose_distinct_layers_and_write_json(inputs, tmp_path, method, ratio, expected):
    if method == "kl_trained" and ratio != 0.5:
        pytest.skip("one ratio is enough for the costly baseline")
    sel = select_layers(SelectConfig(method=method, ratio=ratio, **FAST), LAYERS, inputs)
    assert len(sel.gdn_layers) == len(set(sel.gdn_layers)) == expected
    assert all(0 <= i < LAYERS for i in sel.gdn_layers) and len(sel.scores) == LAYERS
    # The chosen layers are the least damaged ones.
    assert max(sel.scores[i] for i in sel.gdn_layers) <= min(
        s for i, s in enumerate(sel.scores) if i not in sel.gdn_layers)
    write_selection(sel, tmp_path)
    saved = json.loads((tmp_path / "selection.json").read_text())
    for key in ("scores", "gdn_layers", "method", "calibration_tokens", "compute_tokens", "compute_flops",
                "flops_formula", "seconds"):
        assert key in saved
    assert (tmp_path / "selection.png").stat().st_size > 0
    assert read_selection(tmp_path).gdn_layers == sel.gdn_layers


def test_window_covering_everything_does_no_damage(inputs):
    cfg = SelectConfig(method="swa_proxy", window=100_000, min_distance=0, calibration_rows=4,
                       calibration_samples=2)
    sel = select_layers(cfg, LAYERS, inputs)
    assert max(abs(s) for s in sel.scores) < 1e-9
    assert sel.calibration["parts"]["text"]["scored_positions"] > 0


def test_window_mask_is_causal_per_document_and_local():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    mask = sliding_window_mask(pos, window=2, dtype=torch.float32, additive=False)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False, False]
    assert mask[4].tolist() == [False] * 4 + [True, False, False]  # a new document sees only itself
    additive = sliding_window_mask(pos, 2, torch.float32, additive=True)[0, 0]
    assert torch.equal(additive == 0, mask)


@pytest.mark.parametrize("method", ["swa_proxy", "gdn_proxy", "kl_trained"])
def test_crucial_layer_stays_attention(crucial_inputs, method):
    sel = select_layers(SelectConfig(method=method, ratio=0.75, **FAST), LAYERS, crucial_inputs)
    assert sel.gdn_layers == [0, 1, 3]
    # Untrained replacements of a silent layer stay silent; a trained one may drift a little.
    silent = 1e-9 if method != "kl_trained" else sel.scores[2] / 2
    assert sel.scores[2] > 0 and all(abs(sel.scores[i]) < silent for i in (0, 1, 3))


def test_greedy_matches_one_shot_without_interactions_and_is_deterministic(crucial_inputs, inputs):
    cfg = SelectConfig(method="swa_proxy", ratio=0.5, greedy=True, **FAST)
    greedy = select_layers(cfg, LAYERS, crucial_inputs)
    assert greedy.gdn_layers == [0, 1] and len(greedy.greedy_rounds) == 2
    # Layers whose attention contributes nothing cannot interact: later rounds repeat round one.
    assert greedy.greedy_rounds[1]["2"] == pytest.approx(greedy.greedy_rounds[0]["2"], abs=1e-9)
    first, second = (select_layers(cfg, LAYERS, inputs) for _ in range(2))
    assert first.gdn_layers == second.gdn_layers and first.greedy_rounds == second.greedy_rounds


def _passes(first_layers) -> float:
    """Full-forward equivalents of scoring these layers: a pass from layer i runs (L - i) / L."""
    return sum((LAYERS - i) / LAYERS for i in first_layers)


def test_compute_accounting(inputs):
    one = select_layers(SelectConfig(method="swa_proxy", ratio=0.5, **FAST), LAYERS, inputs)
    params = sum(p.numel() for p in inputs.teacher.parameters())
    calib = one.calibration_tokens
    assert calib > 0 and one.seconds > 0
    # One recording pass, then every layer scored from its own depth up.
    assert one.compute_tokens == round(calib * (1 + _passes(range(LAYERS))))
    assert one.compute_flops == pytest.approx(2 * params * calib * (1 + _passes(range(LAYERS))))
    greedy = select_layers(SelectConfig(method="swa_proxy", ratio=0.5, greedy=True, **FAST), LAYERS, inputs)
    first = int(next(iter(k for k in greedy.greedy_rounds[0] if k not in greedy.greedy_rounds[1])))
    rest = [i for i in range(LAYERS) if i != first]
    assert greedy.compute_tokens == round(calib * (2 + _passes(range(LAYERS)) + _passes(rest)))
    trained = select_layers(SelectConfig(method="kl_trained", ratio=0.5, **FAST), LAYERS, inputs)
    train_tokens = LAYERS * FAST["trained_steps"] * FAST["trained_batch_size"] * 64
    assert trained.backward_tokens == train_tokens
    forward = calib * (1 + _passes(range(LAYERS))) + 2 * train_tokens
    assert trained.compute_flops == pytest.approx(2 * params * forward + 4 * params * train_tokens)
    assert trained.compute_flops > one.compute_flops


def test_replayed_scores_equal_full_passes(inputs):
    """Replaying the unchanged lower layers from the recording gives the damage of a full pass."""
    from factory.priming.scoring import (Compute, build_calibration, build_probe, damage, record,
                                         replace_layer)

    cfg = SelectConfig(method="gdn_proxy", **FAST)
    parts = build_calibration(cfg, inputs)
    probe = build_probe(inputs.teacher, "gdn", inputs.init, 0)
    rec = record(probe, parts, 4, "cpu", Compute())
    undo = replace_layer(probe, 2, "gdn", cfg.window)
    full, _ = damage(probe, inputs.teacher, parts, rec, "kl", 4, "cpu", Compute(), start=0)
    replayed, _ = damage(probe, inputs.teacher, parts, rec, "kl", 4, "cpu", Compute(), start=2)
    undo()
    assert full > 0 and replayed == pytest.approx(full, rel=1e-5)


def test_probe_shares_the_teacher_and_holds_one_gdn_at_a_time(inputs):
    """The gdn probe is no copy: its tensors are the teacher's, and a layer's GDN exists only while
    that layer is replaced, with the weights the whole-model init gives it."""
    from factory.priming.init import build_hybrid_from_teacher
    from factory.priming.scoring import build_probe, replace_layer

    teacher = inputs.teacher
    probe = build_probe(teacher, "gdn", inputs.init, 0)
    ours = probe.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert ours[name].data_ptr() == tensor.data_ptr(), name
    gdn = lambda: {n: p for n, p in probe.named_parameters() if ".linear_attn." in n}  # noqa: E731
    assert all(p.is_meta for p in gdn().values())
    undo = replace_layer(probe, 2, "gdn", 8)
    live = {n: p for n, p in gdn().items() if not p.is_meta}
    assert live and all(n.startswith("model.layers.2.") for n in live)
    whole = build_hybrid_from_teacher(teacher, ["linear_attention"] * LAYERS, inputs.init, 0).state_dict()
    for name, tensor in live.items():
        assert torch.equal(tensor, whole[name]), name
    undo()
    assert all(p.is_meta for p in gdn().values())


def test_bad_metric_is_one_line(inputs):
    with pytest.raises(ValueError, match="select.metric='mse'"):
        select_layers(SelectConfig(method="swa_proxy", metric="mse", **FAST), LAYERS, inputs)


def test_loss_metric_sees_only_the_layer_that_matters(crucial_inputs):
    # On a random teacher the loss change of the crucial layer may have either sign; the layers
    # without attention output must all score exactly alike.
    sel = select_layers(SelectConfig(method="swa_proxy", metric="loss", ratio=0.75, **FAST), LAYERS, crucial_inputs)
    assert sel.scores[0] == sel.scores[1] == sel.scores[3] != sel.scores[2]


def test_pipeline_select_stage_states_its_share_of_priming(assets, tmp_path):
    from factory.config.validate import validate_static
    from factory.pipeline import run_pipeline

    cfg = tiny_pipeline_config(assets, tmp_path / "run", stages=("select", "init", "align"), steps=2)
    cfg.select = SelectConfig(method="swa_proxy", ratio=0.5, **FAST)
    validate_static(cfg)
    root = run_pipeline(cfg, "")
    sel = read_selection(root / "01-select")
    params = sum(p.numel() for p in _inputs(assets).teacher.parameters())
    assert sel.priming_flops == 2 * params * 2 * 2 * 64  # align: 2 steps of 2 rows of 64 tokens, forward only
    assert len(sel.gdn_layers) == 2 and sel.share_of_priming == pytest.approx(sel.compute_flops / sel.priming_flops)
    init_model = json.loads((root / "02-init" / "model" / "config.json").read_text())
    assert [i for i, t in enumerate(init_model["layer_types"]) if t == "linear_attention"] == sel.gdn_layers


def test_calibration_files_in_either_format(inputs, assets, tmp_path):
    """select.calibration_files takes text files ({"text"}) and recall files ({"prompt", "answer"}), told
    apart by their keys: text rows feed the text part, recall items the answer part, with only each
    item's answer tokens scored (in place of the synthetic samples)."""
    from factory.data.packing import IGNORE_INDEX
    from factory.data.synthetic import encode_sample
    from factory.eval.recall import RecallItem
    from factory.priming.scoring import build_calibration

    items = [RecallItem("Key ab is 12. Key cd is 7. Key ab is", " 12"), RecallItem("The passkey is 4821. It is", " 4821")]
    recall = tmp_path / "recall.jsonl"
    recall.write_text("".join(json.dumps({"prompt": i.prompt, "answer": i.answer}) + "\n" for i in items))
    cfg = SelectConfig(method="gdn_proxy", calibration_files=[str(assets["heldout"]), str(recall)], **FAST)
    text, answers = build_calibration(cfg, inputs)
    default_text, synthetic = build_calibration(SelectConfig(method="gdn_proxy", **FAST), inputs)
    assert torch.equal(text.input_ids, default_text.input_ids)  # the held-out file, given as a text file
    assert answers.name == synthetic.name == "answers" and answers.input_ids.shape[0] == len(items)
    for row, item in enumerate(items):
        ids, n_answer = encode_sample(inputs.tokenizer, item)
        assert answers.input_ids[row, : len(ids)].tolist() == ids
        scored = (answers.labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(len(ids) - n_answer - 1, len(ids) - 1))  # positions predicting the answer
        assert answers.labels[row, scored].tolist() == ids[-n_answer:]
    only_recall = SelectConfig(method="gdn_proxy", calibration_files=[str(recall)], **FAST)
    text_only_recall, _ = build_calibration(only_recall, inputs)
    assert torch.equal(text_only_recall.input_ids, default_text.input_ids)  # text falls back to held-out files
    sel = select_layers(only_recall, LAYERS, inputs)
    assert sel.calibration["answers"] == [str(recall)] and sel.calibration["parts"]["answers"]["rows"] == 2
