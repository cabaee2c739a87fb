"""Plugins: parts defined outside the repository (a modality's encoder and processor, a decoder, a
foundation, a data source), registered before a recipe is read, in the driver and in every worker.

Two routes, both loaded by `load_plugins`:

- an installed package declares an entry point in the `omniscale.plugins` group; every installed one
  loads in every process:

      [project.entry-points."omniscale.plugins"]
      sensor = "omni_sensor:register"

- the recipe names them under its top-level `plugins` key (e.g. a module on PYTHONPATH, not installed):

      plugins: ["omni_sensor:register"]

A value is `module:function` (the function is called with no arguments and registers its parts with
omni_models.registry.register_encoder and the like) or `module` (imported: for a module that registers
its parts when imported). Nothing is loaded when omni-train is imported: omni_train.config.load_config
loads them before it validates a recipe (its model section names registered parts), and the local and
Ray worker entries before they validate the recipe they are sent. Loading twice in a process is
harmless: registering the same class under the same name again is a no-op.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from functools import reduce
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from omni_train.config import ConfigError

GROUP = "omniscale.plugins"

log = logging.getLogger("omni_train")


def load_plugins(modules: Any = ()) -> None:
    """Load every installed `omniscale.plugins` entry point, then the recipe's `plugins` (`modules`).

    A plugin that cannot be imported, or whose function raises, is a ConfigError naming the entry point
    (or `plugins[i]`) and its value."""
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(
            f"plugins: a list of modules ('pkg.module' or 'pkg.module:function'), got {modules!r}"
        )
    for ep in entry_points(group=GROUP):
        dist = f", from {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
        _run(f"entry point {ep.name!r} ({GROUP}{dist})", ep.value, ep.load)
    for i, value in enumerate(modules):
        _run(f"plugins[{i}]", value, lambda value=value: _resolve(value))


def _resolve(value: str) -> Any:
    """The module `module`, or the attribute `attr` of `module:attr` (dotted attributes allowed)."""
    module, _, attr = value.partition(":")
    target = importlib.import_module(module.strip())
    return reduce(getattr, attr.strip().split("."), target) if attr.strip() else target


def _run(where: str, value: str, load: Callable[[], Any]) -> None:
    try:
        target = load()
    except Exception as e:  # any failure while importing the plugin: named by its key and value
        raise ConfigError(f"{where}: cannot import {value!r}: {type(e).__name__}: {e}") from e
    if callable(target) and not isinstance(target, ModuleType):
        try:
            target()
        except Exception as e:
            raise ConfigError(f"{where}: {value!r} failed: {type(e).__name__}: {e}") from e
    log.debug("plugin loaded: %s = %s", where, value)
