"""Self-contained modeling files for saved checkpoints.

``save_pretrained`` copies the modeling files for ``trust_remote_code`` loading, but ours import
``factory``. A served checkpoint must load without this package, so ``write_remote_code`` (run
after the weights and config are written) also writes the GDN layer and the kernels beside them,
their ``factory`` imports made relative.
"""

from __future__ import annotations

import re
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[3]  # the directory holding the factory package

# module -> file name in the saved directory (longest module names first when rewriting)
REMOTE_FILES = {
    "factory.models.hqwen3.configuration_hqwen3": "configuration_hqwen3",
    "factory.models.hqwen3.modeling_hqwen3": "modeling_hqwen3",
    "factory.layers.gdn": "gdn",
    "factory.ops.gated_delta_rule.naive": "gated_delta_rule_naive",
    "factory.ops.gated_delta_rule.fla_backend": "gated_delta_rule_fla",
    "factory.ops.gated_delta_rule": "gated_delta_rule",
}


def _source_path(module: str) -> Path:
    path = _ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _relative_imports(source: str) -> str:
    for module in sorted(REMOTE_FILES, key=len, reverse=True):
        pattern = rf"from {re.escape(module)} import"
        source = re.sub(pattern, f"from .{REMOTE_FILES[module]} import", source)
    if "from factory" in source or "import factory" in source:
        raise RuntimeError("a modeling file imports a factory module missing from REMOTE_FILES")
    return source


def write_remote_code(save_directory: str | Path) -> None:
    save_directory = Path(save_directory)
    for module, name in REMOTE_FILES.items():
        text = _relative_imports(_source_path(module).read_text())
        (save_directory / f"{name}.py").write_text(text)
