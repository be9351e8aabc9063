"""The run modes behind `config.mode`: a name -> function registry.

Each mode is `fn(config, workdir)`. `MODES` maps names to "module:function" import paths, loaded
lazily (so a mode's heavy imports cost nothing to the others and modules may import this one);
to add a mode, add one line here or call `register` from anywhere before `run`.
"""

import importlib
from collections.abc import Callable
from typing import Any

ModeFn = Callable[[Any, str], Any]

MODES: dict[str, str | ModeFn] = {
  "pretrain": "metaprune_jax.modes.pretrain:pretrain",
  "generate": "metaprune_jax.modes.meta:generate",
  "meta_train": "metaprune_jax.modes.meta:meta_train",
  "visualize": "metaprune_jax.modes.visualize:visualize",
  "prune": "metaprune_jax.modes.prune:prune",
  "all": "metaprune_jax.modes.pipeline:run_all",
}


def register(name: str, fn: str | ModeFn) -> None:
  """Adds or replaces mode `name` (a function or a "module:function" path)."""
  MODES[name] = fn


def get(name: str) -> ModeFn:
  """The function of mode `name`. Raises ValueError for an unknown mode."""
  if name not in MODES:
    raise ValueError(f"Unknown mode {name!r}; known modes: {sorted(MODES)}.")
  fn = MODES[name]
  if isinstance(fn, str):
    module, attr = fn.split(":")
    fn = getattr(importlib.import_module(module), attr)
  return fn


def run(config, workdir: str) -> Any:
  """Runs `config.mode` on `workdir`."""
  return get(config.mode)(config, workdir)
