"""Recipe V5: V2's balance (reg 0.1, ratios 0.1, lr 3e-3) with the reference's early decay
(lr x0.1 after epoch 6 of 30), whole-split cross-entropy."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base  # noqa: E402


def get_config(arg=None):
  del arg
  return _base.search_config(meta_train__epochs=30, meta_train__lr_milestones=(6,),
                             meta_train__batches_per_model=0, meta_train__reg=0.1,
                             meta_train__lr=3e-3, metanet__node_res_ratio=0.1,
                             metanet__edge_res_ratio=0.1)
