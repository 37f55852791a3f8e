"""Config composition, precedence and the one-line errors for bad input (CPU, seconds, no network)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from factory.config import FACTORY_ROOT, available_recipes, compose
from factory.config.validate import (ConfigError, check_pipeline_dir, resolve_model_path, validate_inputs,
                                     validate_static)
from factory.rundir import PipelineDir
from tests.helpers import run_prime_cases

RECIPES = ["gdn_25pct", "gdn_50pct", "gdn_75pct"]
MODELS = ["tiny", "qwen3_0.6b", "qwen3_1.7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b"]
TEACHER = FACTORY_ROOT / "assets" / "teacher"


def write_model(path: Path, *, vocab_size=64, tokens=50, layers=4, model_type="qwen3") -> Path:
    """A config.json, a word-level tokenizer of ``tokens`` entries and a placeholder weights file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    path.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(tokens)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16).save_pretrained(path)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))  # validation reads the header only
    if model_type != "qwen3":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return path


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def inputs(tmp_path):
    """Overrides pointing the default recipe at a fake 4-layer model and fake data in tmp (enough tokens
    for one batch of align/distill and one eval row: 8 x 512 and 512)."""
    model = write_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", [" ".join(f"t{i % 50}" for i in range(600))] * 8)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [" ".join(f"t{i % 50}" for i in range(600))])
    return ["+recipe=gdn_50pct", f"model.path='{model}'", f"data.train_files=['{train}']",
            f"data.heldout_files=['{heldout}']", f"output_dir='{tmp_path / 'run'}'",
            "stages=[select,init,align,distill,export,eval]"]


def refused(check, cfg, *fragments):
    with pytest.raises(ConfigError) as err:
        check(cfg)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_recipes_are_discovered():
    assert available_recipes() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_recipe_composes_and_validates(model, recipe):
    cfg, yaml = compose([f"+recipe={recipe}", f"model={model}"])
    validate_static(cfg)
    assert cfg.recipe == recipe
    assert cfg.stages == ["select", "init", "align", "distill", "longctx", "sft", "export", "eval"]
    assert cfg.select.ratio == int(recipe[4:6]) / 100
    assert cfg.align.loss == "layerwise"
    assert "${" not in yaml and f"recipe: {recipe}" in yaml
    expected = str(TEACHER) if model == "tiny" else f"Qwen/Qwen3-{model[6:].upper()}"
    assert cfg.model.path == expected


def test_model_path_override_beats_group():
    cfg, _ = compose(["+recipe=gdn_50pct", "model=qwen3_8b", "model.path=/local/qwen3-8b"])
    assert (cfg.model.name, cfg.model.path) == ("qwen3-8b", "/local/qwen3-8b")


def test_tiny_default_validates_inputs(tmp_path):
    if not (TEACHER / "config.json").is_file():
        pytest.skip("embedded teacher not built yet (assets/teacher/config.json missing; see assets/build_teacher.py)")
    cfg, _ = compose(["+recipe=gdn_50pct", f"output_dir='{tmp_path / 'run'}'"])
    validate_static(cfg)
    validate_inputs(cfg)
    check_pipeline_dir(cfg)


def test_command_line_beats_recipe_beats_primary():
    primary, _ = compose([])
    recipe, _ = compose(["+recipe=gdn_25pct"])
    cli, _ = compose(["+recipe=gdn_25pct", "select.ratio=0.3", "align.steps=7", "model=qwen3_4b"])
    assert (primary.select.ratio, primary.align.steps, primary.align.optim.schedule) == (0.5, 100, "cosine")
    assert (recipe.select.ratio, recipe.align.steps, recipe.align.optim.schedule) == (0.25, 150, "constant")
    assert (cli.select.ratio, cli.align.steps, cli.align.optim.schedule) == (0.3, 7, "constant")
    assert (primary.model.name, cli.model.name) == ("tiny-qwen3", "qwen3-4b")


@pytest.mark.parametrize("override, fragment", [("select.ratoi=0.5", "ratoi"), ("select.ratio=abc", "abc")])
def test_typo_and_wrong_type_fail_at_composition(override, fragment):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(["+recipe=gdn_50pct", override])
    assert fragment in str(err.value) + str(err.value.__cause__)


CLI_CASES = ("unknown_recipe", "missing_model", "cfg_job")


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """The real command line (``python -m factory.prime``), each case in its own empty directory:
    ``{case: (directory, CompletedProcess)}``, the cases forked from one interpreter (run_prime_cases)."""
    root = tmp_path_factory.mktemp("cli")
    dirs = {name: root / name for name in CLI_CASES}
    for path in dirs.values():
        path.mkdir()
    missing = dirs["missing_model"] / "absent"
    args = {"unknown_recipe": ["+recipe=nope"],
            "missing_model": ["+recipe=gdn_50pct", f"model.path='{missing}'",
                              f"output_dir='{dirs['missing_model'] / 'run'}'"],
            "cfg_job": ["+recipe=gdn_50pct", "--cfg", "job"]}
    (root / "logs").mkdir()
    done = run_prime_cases({name: (dirs[name], args[name]) for name in CLI_CASES}, root / "logs")
    return {name: (dirs[name], done[name]) for name in CLI_CASES}


def test_unknown_recipe_is_one_line_exit_2_nothing_written(cli):
    cwd, proc = cli["unknown_recipe"]
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: unknown recipe 'nope'; available: gdn_25pct, gdn_50pct, gdn_75pct"]
    assert list(cwd.iterdir()) == []
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        compose(["+recipe=nope"])


def test_cli_bad_input_is_one_line_exit_2_nothing_written(cli):
    cwd, proc = cli["missing_model"]
    missing = cwd / "absent"
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: model.path '{missing}' not found: give a local checkpoint "
                                        "directory or a hub id already in the HF cache"]
    assert list(cwd.iterdir()) == []


def test_cfg_job_prints_resolved_config(cli):
    cwd, proc = cli["cfg_job"]
    assert proc.returncode == 0, proc.stderr
    assert "recipe: gdn_50pct" in proc.stdout and f"path: {TEACHER}" in proc.stdout
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("ratio", ["0", "1.5", "1.0", "-0.2"])
def test_ratio_outside_open_interval(ratio):
    cfg, _ = compose(["+recipe=gdn_50pct", f"select.ratio={ratio}"])
    refused(validate_static, cfg, f"select.ratio={float(ratio)}", "(0, 1)")


@pytest.mark.parametrize("override, fragments", [
    ("stages=[init,select]", ["out of order", "select, init"]),
    ("stages=[select,warp]", ["'warp'", "longctx"]),
    ("select.method=swa", ["'swa'", "manual, alternate"]),
    ("select.method=manual", ["select.method=manual needs"]),
    ("select.layers=[1,2]", ["only used with select.method=manual"]),
    ("on_existing=keep", ["'keep'", "resume, overwrite"]),
    ("precision=fp16", ["'fp16'", "bf16"]),
    ("device=tpu", ["'tpu'", "cuda"]),
    ("align.loss=kl", ["align.loss='kl'", "layerwise, pre_lm_head"]),
    ("distill.trainable=lora", ["'lora'", "gdn+norms"]),
    ("distill.teacher=bigger", ["distill.teacher='bigger'", "auto, shared, separate"]),
    ("distill.teacher_stream=both", ["distill.teacher_stream='both'", "per_layer, whole"]),
    ("deepspeed.max_reuse_distance=-1", ["deepspeed.max_reuse_distance=-1 must be an integer >= 0"]),
    ("distill.trainable=gdn+norms distill.teacher=shared", ["distill.teacher=shared needs distill.trainable=gdn"]),
    ("distill.trainable=gdn+norms distill.teacher=auto", None),
    ("align.optim.schedule=linear", ["'linear'", "cosine, constant"]),
    ("logger=wandb", None),
    ("logger.kind=tensorboard", ["'tensorboard'", "none, wandb"]),
    ("logger.mode=cloud", ["'cloud'", "offline, online"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage=4", "0, 1, 2, 3"]),
    ("longctx.sp_degree=3", ["longctx.seq_len=2048 is not divisible by longctx.sp_degree=3"]),
    ("longctx.offload_checkpoints=true", ["longctx.offload_checkpoints=true needs longctx.activation_checkpointing"]),
    ("longctx.tiled_mlp_tokens=-1", ["longctx.tiled_mlp_tokens=-1 must be 0 (off) or a positive token count"]),
    ("longctx.max_position_embeddings=1024", ["longctx.max_position_embeddings=1024", "below the row length"]),
    ("longctx.trainable=mlp", ["'mlp'", "gdn+norms+attention"]),
    ("data.chat_overflow=wrap", None),  # checked with the inputs (sft only)
])
def test_static_values_are_checked(override, fragments):
    cfg, _ = compose(["+recipe=gdn_50pct", *override.split()])
    if fragments is None:
        validate_static(cfg)
    else:
        refused(validate_static, cfg, *fragments)


def test_manual_layers_repeated_and_out_of_range(inputs):
    cfg, _ = compose([*inputs, "select.method=manual", "select.layers=[1,3,1]"])
    refused(validate_static, cfg, "index 1 is repeated")
    cfg, _ = compose([*inputs, "select.method=manual", "select.layers=[1,4]"])
    validate_static(cfg)
    refused(validate_inputs, cfg, "index 4 is out of range", "0..3 for a 4-layer model")
    cfg, _ = compose([*inputs, "select.method=manual", "select.layers=[0,3]"])
    validate_inputs(cfg)


def test_missing_model_path(inputs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for path in (str(tmp_path / "nope"), "Qwen/Qwen3-0.6B"):
        cfg, _ = compose([*inputs, f"model.path='{path}'"])
        refused(validate_inputs, cfg, f"model.path '{path}' not found", "hub id already in the HF cache")


def test_hub_id_in_local_cache_is_accepted(inputs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B"
    write_model(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("Qwen/Qwen3-0.6B") == repo / "snapshots" / "abc123"
    cfg, _ = compose([*inputs, "model.path=Qwen/Qwen3-0.6B"])
    validate_inputs(cfg)


def test_tokenizer_larger_than_model_vocab(inputs, tmp_path):
    model = write_model(tmp_path / "wide", vocab_size=64, tokens=80)
    cfg, _ = compose([*inputs, f"model.path='{model}'"])
    refused(validate_inputs, cfg, "80 tokens", "vocab_size is 64")


def test_checkpoint_without_weights(inputs, tmp_path):
    model = write_model(tmp_path / "bare")
    (model / "model.safetensors").unlink()
    cfg, _ = compose([*inputs, f"model.path='{model}'"])
    refused(validate_inputs, cfg, f"model.path '{model}' has no weights", "model.safetensors")


def test_llama_config_is_refused(inputs, tmp_path):
    model = write_model(tmp_path / "llama", model_type="llama")
    cfg, _ = compose([*inputs, f"model.path='{model}'"])
    refused(validate_inputs, cfg, "model family 'llama' is not supported; supported: qwen3")


def test_empty_and_missing_dataset(inputs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"text": "  "}\n{"other": "x"}\n\n')
    cfg, _ = compose([*inputs, f"data.train_files=['{empty}']"])
    refused(validate_inputs, cfg, f"data.train_files: '{empty}' is empty")
    cfg, _ = compose([*inputs, f"data.heldout_files=['{tmp_path / 'gone.jsonl'}']"])
    refused(validate_inputs, cfg, f"data.heldout_files: '{tmp_path / 'gone.jsonl'}' not found")
    cfg, _ = compose([*inputs, "data.train_files=[]"])
    refused(validate_inputs, cfg, "data.train_files is empty")


def test_existing_pipeline_dir(inputs, tmp_path):
    cfg, yaml = compose(inputs)
    PipelineDir(cfg.output_dir).initialize(cfg, yaml, overwrite=False)
    check_pipeline_dir(cfg)  # same config: resume
    changed, _ = compose([*inputs, "select.ratio=0.25"])
    check_pipeline_dir(changed)  # other settings: each stage reruns or is reused by its own identity
    overwrite, _ = compose([*inputs, "select.ratio=0.25", "on_existing=overwrite"])
    check_pipeline_dir(overwrite)
    threads, _ = compose([*inputs, "threads=1"])  # run control, not identity
    check_pipeline_dir(threads)


def test_foreign_output_dir_is_never_adopted(inputs, tmp_path):
    cfg, _ = compose([*inputs, "on_existing=overwrite"])
    Path(cfg.output_dir).mkdir()
    check_pipeline_dir(cfg)  # empty: fine
    (Path(cfg.output_dir) / "notes.txt").write_text("mine")
    refused(check_pipeline_dir, cfg, "is not a pipeline directory")


def test_sequence_parallel_needs_several_processes():
    cfg, _ = compose(["+recipe=gdn_50pct", "stages=[select,init,align,longctx]", "longctx.sp_degree=2"])
    refused(validate_static, cfg, "longctx.sp_degree=2 needs several processes", "deepspeed=zero3")
    cfg, _ = compose(["+recipe=gdn_50pct", "stages=[select,init,align,longctx]", "longctx.sp_degree=2",
                      "deepspeed=zero3"])
    validate_static(cfg)


def write_chat(path: Path, role="assistant") -> Path:
    record = {"messages": [{"role": "user", "content": "t1"}, {"role": role, "content": "t2"}]}
    path.write_text(json.dumps(record) + "\n")
    return path


def test_sft_needs_chat_template_known_roles_and_overflow_policy(inputs, tmp_path):
    chat = write_chat(tmp_path / "chat.jsonl")
    sft = [*inputs, "stages=[select,init,align,distill,sft,export,eval]", f"data.chat_files=['{chat}']",
           f"data.chat_heldout_files=['{chat}']"]
    cfg, _ = compose(sft)
    refused(validate_inputs, cfg, "no chat template", "drop sft from stages")
    model = Path(cfg.model.path)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    validate_inputs(compose(sft)[0])
    robot = write_chat(tmp_path / "robot.jsonl", role="robot")
    refused(validate_inputs, compose([*sft, f"data.chat_files=['{robot}']"])[0], "role 'robot'", "accepted")
    refused(validate_inputs, compose([*sft, "data.chat_overflow=wrap"])[0], "'wrap'", "truncate, drop")
    gone = tmp_path / "gone.jsonl"
    refused(validate_inputs, compose([*sft, f"data.chat_heldout_files=['{gone}']"])[0], "not found")
