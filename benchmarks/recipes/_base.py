"""Shared loader for the recipe-search configs: configs/digits.py plus overrides."""

import importlib.util
import os


def digits_config():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location("_recipe_digits",
                                                os.path.join(root, "configs", "digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def search_config(**meta):
  """digits.py with the search's fixed network and data-model recipe (``resnet8``, 16/32/64
  channels: the slack ``resnet_tiny`` lacks; 8 data models trained like the base network) and
  meta-training overrides ``meta`` (``metanet.*`` / ``meta_train.*`` keys)."""
  mod = digits_config()
  c = mod.get_config()
  c.arch = "resnet8"
  c.generate.num_models = 8
  c.generate.train = mod.schedule()
  for k, v in meta.items():
    section, key = k.split("__")
    c[section][key] = v
  return c
