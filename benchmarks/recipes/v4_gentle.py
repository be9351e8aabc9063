"""Recipe V4: regulariser 1000x weaker than the reference's (reg 0.01), residual ratios 0.1,
lr 3e-3, 30 epochs, cross-entropy over the whole training split at every step."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base  # noqa: E402


def get_config(arg=None):
  del arg
  return _base.search_config(meta_train__epochs=30, meta_train__lr_milestones=(24,),
                             meta_train__batches_per_model=0, meta_train__reg=0.01,
                             meta_train__lr=3e-3, metanet__node_res_ratio=0.1,
                             metanet__edge_res_ratio=0.1)
