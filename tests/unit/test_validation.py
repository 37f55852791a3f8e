"""Every check before anything is written: the bad-value sweep over the table of accepted values,
unknown keys, Hydra errors, the environment, model files, data lengths, stage lists, ``~``, and
the one-line report of an unexpected failure (CPU, no network)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from factory.config import FACTORY_ROOT, compose, compose_dict
from factory.config.overrides import schema_keys
from factory.config.ranges import RULES, UNCONSTRAINED, UNCONSTRAINED_PATTERNS
from factory.config.schema import PrimeConfig
from factory.prime import main, precheck, run
from tests.helpers import run_prime_cases

TEACHER = FACTORY_ROOT / "assets" / "teacher"
RECIPE = "+recipe=gdn_50pct"


def stopped(capsys, call) -> tuple[int, list[str]]:
    """Exit code and stderr lines of a CLI entry point that must stop with SystemExit."""
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return stop.value.code, err.strip().splitlines()


def one_error(capsys, call, *fragments, code: int = 2) -> str:
    exit_code, lines = stopped(capsys, call)
    assert exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (exit_code, lines)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def base():
    return compose_dict([RECIPE])


def leaf_fields() -> dict[str, object]:
    """Every leaf field of the schema with its type."""
    out = {}
    for path, nested in schema_keys().items():
        if nested is None:
            parent, _, name = path.rpartition(".")
            owner = PrimeConfig if not parent else schema_keys()[parent]
            out[path] = typing.get_type_hints(owner)[name]
    return out


def test_every_number_or_word_field_has_a_rule_or_is_listed_as_free():
    for path, kind in leaf_fields().items():
        if kind is bool or path in RULES or path in UNCONSTRAINED or any(p in path for p in UNCONSTRAINED_PATTERNS):
            continue
        pytest.fail(f"{path} ({kind}) has no rule in factory/config/ranges.py RULES and is not in UNCONSTRAINED")
    assert set(RULES) <= set(leaf_fields()), set(RULES) - set(leaf_fields())


@pytest.mark.parametrize("path", sorted(RULES))
def test_bad_value_sweep(path, base, tmp_path, capsys):
    """Each field outside its accepted set or range: exit 2, one line naming field, value and what is
    accepted, no traceback, nothing written (the composed config as the CLI hands it over)."""
    rule = RULES[path]
    cfg = copy.deepcopy(base)
    OmegaConf.update(cfg, "output_dir", str(tmp_path / "run"), merge=False)
    OmegaConf.update(cfg, path, rule.bad, merge=False)
    shown = repr(rule.bad) if rule.choice else str(rule.bad)
    one_error(capsys, lambda: run(cfg), f"{path}=", shown.strip("[]"), rule.accepted)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, fragments", [
    ("eval.batch_size=0", ["eval.batch_size=0", "an integer >= 1"]),
    ("eval.heldout_rows=0", ["eval.heldout_rows=0", "an integer >= 1"]),
    ("select.ratio=1.5", ["select.ratio=1.5", "(0, 1)"]),
    ("select.ratio=abc", ["select.ratio=abc", "float"]),
    ("data.synthetic_mix=1.0", ["data.synthetic_mix=1.0", "[0, 1)", "synthetic recall rows"]),
    ("init.kv_heads=full", ["init.kv_heads='full'", "shared, expanded"]),
    ("+align.stpes=5", ["unknown key 'align.stpes'", "did you mean align.steps"]),
    ("align.stpes=5", ["unknown key 'align.stpes'", "did you mean align.steps"]),
    ("+foo=1", ["unknown key 'foo'", "known keys: recipe"]),
    ("model=nope", ["model=nope", "qwen3_32b", "tiny"]),
    ("stages=[export,eval]", ["stages=[export,eval]", "must start with select, init"]),
    ("stages=[align]", ["align needs the model of init", "stages=[select,init,align]"]),
    ("stages=[select,align]", ["align needs the model of init"]),
])
def test_cli_in_process(override, fragments, tmp_path, capsys):
    one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}", override]), *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["kl_restore", "kl_trained"])
def test_greedy_with_a_trained_method_is_one_line(method, tmp_path, capsys):
    """Greedy refinement is for the proxies; the trained methods would refuse it only after loading
    the teacher."""
    one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}", f"select.method={method}",
                                    "select.greedy=true"]),
              "select.greedy=true", f"select.method={method}", "swa_proxy or gdn_proxy")
    assert list(tmp_path.iterdir()) == []


REAL_CLI = [
    ("+align.stpes=5", "did you mean align.steps"),
    ("eval.batch_size=0", "eval.batch_size=0 must be an integer >= 1"),
    ("deepspeed=zero3", "launch with torchrun"),
    ("data.seq_len=8192", "beyond the model's 4,096 positions"),
]


@pytest.fixture(scope="module")
def real_cli(tmp_path_factory) -> dict:
    """``python -m factory.prime`` for real with each override of REAL_CLI, each in its own empty
    directory (forked from one interpreter, tests.helpers.run_prime_cases): ``{override: (dir, result)}``."""
    root = tmp_path_factory.mktemp("real_cli")
    dirs = {override: root / f"case{i}" for i, (override, _) in enumerate(REAL_CLI)}
    for path in dirs.values():
        path.mkdir()
    (root / "logs").mkdir()
    done = run_prime_cases({f"case{i}": (dirs[o], [RECIPE, f"output_dir={dirs[o] / 'run'}", o])
                            for i, (o, _) in enumerate(REAL_CLI)}, root / "logs")
    return {override: (dirs[override], done[f"case{i}"]) for i, (override, _) in enumerate(REAL_CLI)}


@pytest.mark.parametrize("override, fragment", REAL_CLI)
def test_real_cli(override, fragment, real_cli):
    cwd, proc = real_cli[override]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0] and "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []


def one_field_per_type() -> list[str]:
    """Hydra's type errors are translated by type, so one field of each type stands for the rest."""
    seen = {}
    for path, kind in leaf_fields().items():
        if kind not in (str, typing.Optional[str]) and "launcher" not in path:
            seen.setdefault(str(kind), path)
    return sorted(seen.values())


@pytest.mark.parametrize("path", one_field_per_type())
def test_wrong_type_is_one_line(path):
    from factory.config.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        precheck([RECIPE, f"{path}=abc"])
    message = str(err.value)
    assert "\n" not in message and f"{path}=abc" in message and "accepted" in message, message


def test_unparsable_override_is_one_line():
    from factory.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot parse 'longctx.data_files=\[~/b.jsonl\]'.*quote") as err:
        precheck([RECIPE, "longctx.data_files=[~/b.jsonl]"])
    assert "\n" not in str(err.value)


def test_tilde_is_expanded_quoted_or_not(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, yaml = compose([RECIPE, "output_dir='~/runs/x'", "data.train_files=['~/a.jsonl']",
                         "longctx.data_files=['~/b.jsonl']", "model.path='~/model'"])
    assert cfg.output_dir == f"{tmp_path}/runs/x" and cfg.data.train_files == [f"{tmp_path}/a.jsonl"]
    assert cfg.longctx.data_files == [f"{tmp_path}/b.jsonl"] and cfg.model.path == f"{tmp_path}/model"
    assert "~" not in yaml


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_then_the_corrected_command_runs(tmp_path, capsys):
    args = [RECIPE, f"output_dir={tmp_path / 'run'}", "stages=[select]", "threads=1"]
    one_error(capsys, lambda: main([*args, "device=cuda"]), "device='cuda'", "device=auto or device=cpu")
    assert not (tmp_path / "run").exists()
    main([*args, "device=cpu"])
    assert json.loads((tmp_path / "run" / "01-select" / "stage.json").read_text())["complete"]


def test_launch_mode(tmp_path, capsys, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    args = [RECIPE, f"output_dir={tmp_path / 'run'}"]
    if __import__("importlib").util.find_spec("deepspeed"):
        one_error(capsys, lambda: main([*args, "deepspeed=zero3"]), "torchrun", "deepspeed=none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    one_error(capsys, lambda: main(args), "2 processes were launched but deepspeed is off")


def test_flash_attention_without_flash_attn(tmp_path, capsys):
    if __import__("importlib").util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed")
    one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}",
                                    "model.attn_implementation=flash_attention_2"]), "needs the flash-attn package")


def copy_teacher(tmp_path: Path, drop=()) -> Path:
    model = tmp_path / "model"
    shutil.copytree(TEACHER, model, ignore=shutil.ignore_patterns(*drop) if drop else None)
    return model


def test_truncated_safetensors_names_the_file(tmp_path, capsys):
    model = copy_teacher(tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted copy
    one_error(capsys, lambda: main([RECIPE, f"model.path={model}", f"output_dir={tmp_path / 'run'}"]),
              f"weights file '{weights}' is truncated")
    weights.write_bytes(b"\x10")
    one_error(capsys, lambda: main([RECIPE, f"model.path={model}", f"output_dir={tmp_path / 'run'}"]),
              f"weights file '{weights}' is damaged")
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_files_are_named(tmp_path, capsys):
    model = copy_teacher(tmp_path, drop=("tokenizer*", "chat_template.jinja"))
    one_error(capsys, lambda: main([RECIPE, f"model.path={model}", f"output_dir={tmp_path / 'run'}"]),
              "has no tokenizer files", "tokenizer.json")


@pytest.mark.parametrize("record, fragment", [({"messages": "hi"}, "no 'messages' list"),
                                              ({"messages": ["hi"]}, "is not a {role, content} object"),
                                              (["x"], "no 'messages' list")])
def test_chat_messages_must_be_role_content_objects(record, fragment, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(record) + "\n")
    one_error(capsys, lambda: main([RECIPE, f"data.chat_files=[{chat}]", f"output_dir={tmp_path / 'run'}"]),
              "data.chat_files", f"{chat}:1", fragment)


@pytest.mark.parametrize("key", ["eval.recall_files", "select.calibration_files"])
@pytest.mark.parametrize("lines, fragment", [
    (None, None),
    ([{"prompt": "Key ab is 12. Key ab is"}], "line 1: needs a string 'answer'"),
    ([{"prompt": "x", "answer": " 1"}, {"answer": " 2"}], "line 2: needs a string 'prompt'"),
    ([{"prompt": "Key ab is 12. Key ab is", "answer": "  "}], "line 1: empty 'answer'"),
])
def test_bad_recall_file_is_one_line_before_anything_runs(key, lines, fragment, tmp_path, capsys):
    """eval.recall_files and recall-format select.calibration_files (told from text files by their keys;
    a missing calibration file has no format, and is refused as not found)."""
    path = tmp_path / "recall.jsonl"
    if lines is not None:
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    select = key.startswith("select")
    if fragment is None:
        fragment = "not found" if select else "does not exist"
    extra = ["select.method=gdn_proxy"] if select else []
    one_error(capsys, lambda: main([RECIPE, f"{key}=[{path}]", *extra, f"output_dir={tmp_path / 'run'}"]),
              key, str(path), fragment)
    assert not (tmp_path / "run").exists()


def write_texts(path: Path, words: int) -> Path:
    path.write_text(json.dumps({"text": " ".join(["the"] * words)}) + "\n")
    return path


@pytest.mark.parametrize("key, stages", [("data.train_files", "[select,init,align]"),
                                         ("data.heldout_files", "[select,init,eval]"),
                                         ("longctx.data_files", "[select,init,align,longctx]")])
def test_data_too_short_for_one_batch(key, stages, tmp_path, capsys):
    short = write_texts(tmp_path / "short.jsonl", 100)
    line = one_error(capsys, lambda: main([RECIPE, f"{key}=[{short}]", f"stages={stages}",
                                           f"output_dir={tmp_path / 'run'}"]), f"{key} holds", "fewer than")
    assert "accepted: more data" in line
    assert not (tmp_path / "run").exists()


def test_unexpected_failure_is_one_line_and_a_log(tmp_path, capsys, monkeypatch):
    import factory.prime

    def boom(cfg, resolved_yaml):
        Path(cfg.output_dir).mkdir()
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(factory.prime, "run_pipeline", boom)
    line = one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}", "stages=[select]"]),
                     "error: RuntimeError: boom second line (traceback in ", code=1)
    log = Path(line.split("(traceback in ")[1].rstrip(")"))
    assert log.parent == tmp_path / "run" / "logs" and "Traceback" in log.read_text()


def test_rules_use_their_own_fields():
    assert all(dataclasses.is_dataclass(schema_keys()[p.rpartition(".")[0]]) for p in RULES if "." in p)


@pytest.mark.parametrize("overrides, fragments", [
    (["eval.lm_eval_tasks=[hmf_kv_recal]"], ["eval.lm_eval_tasks: unknown lm-eval task(s) hmf_kv_recal",
                                             "hmf_kv_recall"]),
    (["eval.lm_eval_tasks=[hmf]", "export.format=hqwen3"], ["eval.lm_eval_tasks=[hmf] needs export.format=qwen3_5"]),
    (["eval.lm_eval_tasks=[hmf]", "stages=[select,init,align,eval]"], ["has no export", "export before eval"]),
])
def test_lm_eval_tasks_are_checked_before_anything_runs(overrides, fragments, tmp_path, capsys):
    one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}", *overrides]), *fragments)
    assert not (tmp_path / "run").exists()


def test_lm_eval_tasks_without_lm_eval_installed(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    one_error(capsys, lambda: main([RECIPE, f"output_dir={tmp_path / 'run'}", "eval.lm_eval_tasks=[hmf]"]),
              "needs the lm-eval package", ".[lmeval]")
    assert not (tmp_path / "run").exists()
