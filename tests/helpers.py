"""Tiny models and script loading shared by the tests."""

import importlib.util
import sys
from pathlib import Path

import torch

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def hybrid_config(layer_types=None, **overrides):
    from factory.models.hqwen3 import HQwen3Config

    kwargs = {**TINY, **overrides}
    n = kwargs["num_hidden_layers"]
    layer_types = layer_types or ["full_attention" if i % 2 == 0 else "linear_attention" for i in range(n)]
    return HQwen3Config(**kwargs, layer_types=layer_types)


def tiny_hybrid(seed=0, **overrides):
    from factory.models.hqwen3 import HQwen3ForCausalLM

    torch.manual_seed(seed)
    model = HQwen3ForCausalLM(hybrid_config(**overrides)).eval()
    # Random gates instead of the near-identity defaults, so GDN layers really mix tokens.
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_linear:
                layer.linear_attn.A_log.normal_(0, 0.5)
                layer.linear_attn.o_norm.weight.normal_(1, 0.2)
    return model


def load_script(path: Path):
    """A script that is not part of a package (bench/, bench/study/) as a module, with its own
    directory importable while it loads (the scripts import their siblings)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


# Prepended to ``python -c`` scripts that must see only stock libraries: the editable install's
# finder and the checkout leave the import path, so ``import factory`` fails (asserted), and fla is
# blocked, because transformers' Qwen3.5 picks fla's kernels whenever fla imports, even for CPU
# tensors (where they cannot run): blocked, its own pure-torch GDN path runs.
STOCK_ONLY = """
import os, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "factory"))]
for name in ("fla", "causal_conv1d"):
    sys.modules[name] = None
try:
    import factory
    raise SystemExit("factory is importable")
except ImportError:
    pass
"""


def run_stock_python(script: str, cwd, timeout: int = 600):
    """``script`` in a fresh interpreter that sees only stock libraries (``STOCK_ONLY``)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([sys.executable, "-c", STOCK_ONLY + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ``python -m factory.prime`` once per case, each case a child forked after the imports: the parent
# loads the libraries a run imports (seconds per interpreter) once, and each child then runs
# factory.prime as __main__ in its own working directory with its own stdout and stderr, and exits as
# that command would (its exit status; atexit handlers run). Whatever the imports print is kept apart
# (in a fresh interpreter it would open every case's output).
_PRIME_CASES = """
import json, os, runpy, signal, sys
cases = json.loads(sys.argv[1])
logs, case_timeout = sys.argv[2], int(sys.argv[3])
saved = os.dup(1), os.dup(2)
with open(os.path.join(logs, "imports.out"), "w") as out:
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    import factory.pipeline  # the heavy part of factory.prime's imports; factory.prime runs in each child
    import hydra
    sys.stdout.flush()
    sys.stderr.flush()
os.dup2(saved[0], 1)
os.dup2(saved[1], 2)
codes = {}
for name, (cwd, args) in cases.items():
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(case_timeout)  # SIGALRM's default action ends a case that hangs
        os.chdir(cwd)
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(os.path.join(logs, f"{name}.{stream}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [os.path.join(os.path.dirname(factory.pipeline.__file__), "prime.py"), *args]
        runpy.run_module("factory.prime", run_name="__main__", alter_sys=True)
        sys.exit(0)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


def run_prime_cases(cases: dict[str, tuple[Path, list[str]]], logs: Path, case_timeout: int = 120):
    """``{name: (cwd, args)}`` -> ``{name: CompletedProcess}`` of ``python -m factory.prime *args`` run in
    ``cwd``, all from one interpreter (``_PRIME_CASES``); ``logs`` (outside every ``cwd``) keeps the
    outputs. Asserts that the imports printed nothing."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    plain = {name: (str(cwd), list(args)) for name, (cwd, args) in cases.items()}
    parent = subprocess.run([sys.executable, "-c", _PRIME_CASES, json.dumps(plain), str(logs), str(case_timeout)],
                            env=env, capture_output=True, text=True, timeout=300 + case_timeout * len(cases))
    assert parent.returncode == 0, parent.stderr[-3000:]
    assert (logs / "imports.out").read_text() == ""
    codes = json.loads(parent.stdout.splitlines()[-1])
    return {name: subprocess.CompletedProcess(cases[name][1], codes[name], (logs / f"{name}.stdout").read_text(),
                                              (logs / f"{name}.stderr").read_text()) for name in cases}
