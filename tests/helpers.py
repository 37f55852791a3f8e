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
