"""benchmarks/recipes.py: every recipe names fields that exist in configs/digits.py or that the
library reads with a default (a typo would add a new field silently and change nothing), lands
each value where it names, and passes the config check."""

import os
import sys

import pytest

from metaprune_jax.modes import config_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare_methods  # noqa: E402  pylint: disable=g-import-not-at-top
import recipes  # noqa: E402  pylint: disable=g-import-not-at-top

# Fields the library reads with a default and configs/digits.py leaves out on purpose:
# meta_train.reg_form (modes/meta.py, default "absolute"; checked by config_check) and
# metanet.importance_input (metanetwork/config.py: absent keeps the reference's metanetwork).
OPTIONAL = {"meta_train__reg_form", "metanet__importance_input"}


def _digits():
  return compare_methods.load_config(os.path.join(ROOT, "configs", "digits.py"))


def _node(config, path):
  for name in path:
    config = config[name]
  return config


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipe(name):
  base = _digits()
  config = recipes.get_config(name)
  for key, value in recipes.RECIPES[name].items():
    path = key.split("__")
    parent = _node(base, path[:-1])  # KeyError: a section that digits.py does not have
    assert path[-1] in parent or key in OPTIONAL, (
        f"{name}: {key} is not a field of configs/digits.py")
    got = _node(config, path)
    assert (tuple(got) if isinstance(got, (list, tuple)) else got) == (
        tuple(value) if isinstance(value, (list, tuple)) else value), key
  config_check.check_config(config, num_devices=1, num_local_devices=1, num_processes=1)


def test_unknown_recipe():
  with pytest.raises(ValueError, match="unknown recipe 'v999'"):
    recipes.get_config("v999")
