"""Compose the Hydra config tree in ``conf/`` from a config name and overrides.

The ServerApp, the ClientApp and the launcher all call :func:`compose_config` with the same
two strings carried by the Flower run config, so every process sees the same settings.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedcil.errors import ConfigError, choices_error

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def parse_overrides(overrides: str | Sequence[str]) -> list[str]:
    """Split an overrides string (``"a=1 b.c=x"``, shell quoting allowed) into a list."""
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return list(overrides)


def quote_value(value: str) -> str:
    """A string as a quoted Hydra override value (safe with ``=``, ``,``, spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_values(overrides: Sequence[str]) -> dict[str, object]:
    """``{key: value}`` of overrides as Hydra parses them (quotes removed)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {str(exc).splitlines()[0]}") from None
    return {o.key_or_group: o.value() for o in parsed}


def chooses_num_clients(overrides: Sequence[str]) -> bool:
    """Whether ``overrides`` set ``num_clients``, themselves or through the experiment preset they select.

    Under Flower, a run that does not choose takes the federation's size (see
    :func:`server_app.loop.run_experiment`); one that does needs a federation of that size.
    """
    values = override_values(overrides)
    preset = values.get("experiment")
    return "num_clients" in values or (
        preset is not None and "num_clients" in OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml")
    )


def config_names() -> list[str]:
    """Top-level config files in ``conf/`` (without ``.yaml``)."""
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def group_options(group: str) -> list[str]:
    """The options of one config group, e.g. ``dataset`` -> ``['cifar100', 'digits', ...]``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    """The config groups (sub-directories of ``conf/``)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def _check_group_choices(overrides: list[str]) -> None:
    for key, value in override_values(overrides).items():
        if key in config_groups() and value is not None and value not in group_options(key):
            raise choices_error(f"{key} option", value, group_options(key))


def _unknown_key_error(config_name: str, overrides: list[str], message: str) -> ConfigError:
    """Turn Hydra's multi-line 'Could not override' into one line listing the valid keys."""
    base = _compose_raw(config_name, [o for o in overrides if o.split("=")[0] in config_groups()])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in config_groups() or OmegaConf.select(base, key, default="__missing__") != "__missing__":
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_key) if parent_key else base
        if isinstance(parent, DictConfig):
            where = f"under '{parent_key}'" if parent_key else "at the top level"
            return ConfigError(
                f"unknown config key {key!r}; valid keys {where}: {', '.join(sorted(parent.keys()))}"
            )
        return ConfigError(f"unknown config key {key!r} ({leaf!r} has no parent mapping)")
    return ConfigError(message.splitlines()[0])


def _compose_raw(config_name: str, overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (fcil-sweep) over conf/
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


@lru_cache(maxsize=8)
def _compose_cached(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    if config_name not in config_names():
        raise choices_error("config name", config_name, config_names())
    _check_group_choices(list(overrides))
    try:
        cfg = _compose_raw(config_name, list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise _unknown_key_error(config_name, list(overrides), str(exc)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def compose_config(config_name: str = "config", overrides: str | Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; bad names fail with one line.

    The result is read-only and cached per (name, overrides), so repeated calls in a
    long-lived worker cost nothing.
    """
    return _compose_cached(config_name, tuple(parse_overrides(overrides)))


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (for results files)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
