"""Recipe V1: the reference's balance (reg 10, ratios 0.01, lr 1e-3), trained long (30 epochs),
cross-entropy over the whole training split at every step."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base  # noqa: E402


def get_config(arg=None):
  del arg
  return _base.search_config(meta_train__epochs=30, meta_train__lr_milestones=(24,),
                             meta_train__batches_per_model=0)
