"""Config composition: Hydra's ConfigStore, the ``factory_root`` resolver, typed conversion.

Only this package and ``factory/prime.py`` import Hydra; the rest of the library takes a
``PrimeConfig``. ``compose`` is the Hydra compose API for tests and tools:

    cfg, resolved_yaml = compose(["+recipe=gdn_50pct", "select.ratio=0.25"])
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from factory.config.schema import PrimeConfig
from factory.config.errors import ConfigError
from factory.config.overrides import check_known_keys, expand_paths

FACTORY_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = FACTORY_ROOT / "configs"
RECIPE_DIR = FACTORY_ROOT / "recipes"
PRIMARY = "prime"

__all__ = ["CONFIG_DIR", "RECIPE_DIR", "FACTORY_ROOT", "ConfigError", "PrimeConfig", "available_recipes",
           "check_recipe_overrides", "compose", "compose_dict", "recipe_values", "register_configs",
           "register_resolvers", "resolved_yaml", "to_typed"]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("factory_root"):
        OmegaConf.register_new_resolver("factory_root", lambda: str(FACTORY_ROOT))


def available_recipes() -> list[str]:
    """Recipe names; files starting with ``_`` are shared parts (``_base``), not recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def recipe_values(name: str) -> DictConfig:
    """A recipe's values with the shared parts its ``defaults`` name (``_base``) merged under them, in
    plain OmegaConf (for tools that compose without Hydra). Group overrides in ``defaults`` are not
    applied here."""
    node = OmegaConf.load(RECIPE_DIR / f"{name}.yaml")
    parts = [recipe_values(entry) for entry in node.pop("defaults", []) if isinstance(entry, str)]
    return OmegaConf.merge(*parts, node) if parts else node


def register_configs() -> None:
    """The schema, and each recipes/*.yaml as group ``recipe`` (Hydra only searches ``recipe/``), the
    shared ``_base`` too so that a recipe's ``defaults: [_base]`` finds it."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="prime_schema", node=PrimeConfig)
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def check_recipe_overrides(overrides: list[str]) -> None:
    """Name the available recipes before Hydra's multi-line 'could not find' error can."""
    known = available_recipes()
    for item in overrides:
        key, sep, name = item.lstrip("+").partition("=")
        if sep and key == "recipe" and name not in known:
            raise ConfigError(f"unknown recipe '{name}'; available: {', '.join(known)}")


def to_typed(cfg: DictConfig) -> PrimeConfig:
    """Refuse keys the schema lacks, expand ``~`` in paths (in ``cfg`` too), resolve interpolations and
    build the dataclasses; a bad key or interpolation is a ConfigError."""
    register_resolvers()
    check_known_keys(cfg)
    expand_paths(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config: {str(err).splitlines()[0]}") from None
    if not isinstance(typed, PrimeConfig):
        raise TypeError(f"expected a config composed on prime_schema, got {type(typed).__name__}")
    return typed


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def compose_dict(overrides: list[str] | None = None) -> DictConfig:
    """The composed, untyped config, as ``python -m factory.prime`` hands it to ``factory.prime.run``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    check_recipe_overrides(overrides)
    register_resolvers()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=PRIMARY, overrides=overrides)


def compose(overrides: list[str] | None = None) -> tuple[PrimeConfig, str]:
    """Compose the primary config with command-line style overrides (no Hydra app needed)."""
    cfg = compose_dict(overrides)
    return to_typed(cfg), resolved_yaml(cfg)
