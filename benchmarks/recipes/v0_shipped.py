"""Recipe V0: the metanetwork settings shipped before the search (3 layers x 16, ratios 0.01,
6 epochs, lr 1e-3, reg 10, 2 batches of 64 per model and step), on the search's data models."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base  # noqa: E402


def get_config(arg=None):
  del arg
  return _base.search_config()
