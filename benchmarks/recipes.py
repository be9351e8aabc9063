"""The meta-training recipes of the recipe search (benchmarks/recipe_search.py,
docs/recipe_search.md).

  python benchmarks/compare_methods.py --config=benchmarks/recipes.py:v7_early_reg1 ...

Each recipe is configs/digits.py with the search's fixed network and data-model recipe
(``resnet8``, 8 data models trained like the base network; the shipped defaults) and its own
metanetwork / meta-training settings. All of them take cross-entropy over the whole training
split at every meta-step and train 30 epochs.
"""

import importlib.util
import os

# the later rounds' common settings: the metanetwork epoch chosen on validation curves every 2
# epochs, and round 8's per-group floor for every method (so their baselines are round 8's)
_SELECTED_FLOOR90 = dict(prune__metanet_epoch=0, visualize__every=2, prune__max_pruning_ratio=0.9)
_V5 = dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1)
# what the imitation recipes at the paper's metanetwork size share (rounds 13-14): the
# cross-entropy on batch statistics, the group-norm regulariser nearly off, each channel's
# standing as an input, the learning rate kept to epoch 24, 8 x 64
_IMITATE_8X64 = dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch", meta_train__reg=1e-4,
                     meta_train__lr_milestones=(24,), metanet__importance_input=True,
                     metanet__num_layers=8, metanet__hidden=64)
# round 14's v52: the imitation of both the weights and the signals, at weight 10 (rounds 15-16
# build on it)
_V52 = dict(_IMITATE_8X64, meta_train__imitate_sl=10.0, meta_train__imitate_on="both")
# v52 with one after-pruning finetune epoch; and with the pruned network before it a keep-best
# candidate too
_FT1 = dict(_V52, finetune_after_pruning__epochs=1, finetune_after_pruning__milestones=())
_FT1_START = dict(_FT1, finetune_after_pruning__keep="best_from_start")
_FT2_START = dict(_FT1_START, finetune_after_pruning__epochs=2)  # two epochs (round 19)

RECIPES = {
    # the settings shipped before the search: 3 x 16, ratios 0.01, 6 epochs, lr 1e-3, reg 10,
    # 2 batches of 64 per model and step
    "v0_shipped": dict(metanet__node_res_ratio=0.01, metanet__edge_res_ratio=0.01,
                       meta_train__epochs=6, meta_train__lr_milestones=(4,),
                       meta_train__lr=1e-3, meta_train__reg=10.0,
                       meta_train__batches_per_model=2, prune__metanet_epoch=-1),
    # the reference's balance (reg 10, ratios 0.01, lr 1e-3), trained long
    "v1_ref_long": dict(meta_train__lr_milestones=(24,), meta_train__reg=10.0,
                        meta_train__lr=1e-3, metanet__node_res_ratio=0.01,
                        metanet__edge_res_ratio=0.01),
    # the regulariser 100x weaker, ratios 0.1, lr 3e-3
    "v2_balanced": dict(meta_train__lr_milestones=(24,), meta_train__reg=0.1),
    # reg 1.0 (not run: v2 already collapsed the networks at 0.1)
    "v3_strong": dict(meta_train__lr_milestones=(24,), meta_train__reg=1.0),
    # reg 0.01
    "v4_gentle": dict(meta_train__lr_milestones=(24,), meta_train__reg=0.01),
    # v2 with the reference's early decay (x0.1 after epoch 6): the first round's choice
    "v5_early_decay": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1),
    # v5 with a 3x / 10x stronger regulariser (sparser metanetwork outputs; v2's collapse came
    # with the late decay)
    "v6_early_reg03": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.3),
    # v7: the second round's choice on validation, the shipped default
    "v7_early_reg1": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0),
    # v5 with the paper's ResNet-56 metanetwork size (8 layers, hidden 64)
    "v8_early_8x64": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                          metanet__num_layers=8, metanet__hidden=64),
    # v7 with the relative (scale-invariant) regulariser: uniform shrinking no longer lowers it,
    # only moving norm from a group's less important channels to its more important ones does
    "v9_rel_01": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                      meta_train__reg_form="relative"),
    "v10_rel_1": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0,
                      meta_train__reg_form="relative"),
    "v11_rel_10": dict(meta_train__lr_milestones=(6,), meta_train__reg=10.0,
                       meta_train__reg_form="relative"),
    # the metanetwork also reads each node's normalised group importance (where its channel
    # stands in its group, which round 3 suggested it cannot compute): v7, v9 and v10 with it
    "v12_imp_v7": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0,
                       metanet__importance_input=True),
    "v13_imp_rel_01": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                           meta_train__reg_form="relative", metanet__importance_input=True),
    "v14_imp_rel_1": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0,
                          meta_train__reg_form="relative", metanet__importance_input=True),
    # the relative regulariser without the early decay (it cannot collapse a network by
    # shrinking it, the reason for v5's early decay), with and without the importance input
    "v15_imp_rel_1_late": dict(meta_train__lr_milestones=(24,), meta_train__reg=1.0,
                               meta_train__reg_form="relative",
                               metanet__importance_input=True),
    "v16_imp_rel_10_late": dict(meta_train__lr_milestones=(24,), meta_train__reg=10.0,
                                meta_train__reg_form="relative",
                                metanet__importance_input=True),
    "v17_rel_10_late": dict(meta_train__lr_milestones=(24,), meta_train__reg=10.0,
                            meta_train__reg_form="relative"),
    # stronger: at reg 10 the cross-entropy still decides the metanetwork's direction
    "v18_imp_rel_100_late": dict(meta_train__lr_milestones=(24,), meta_train__reg=100.0,
                                 meta_train__reg_form="relative",
                                 metanet__importance_input=True),
    "v19_imp_rel_1000_late": dict(meta_train__lr_milestones=(24,), meta_train__reg=1000.0,
                                  meta_train__reg_form="relative",
                                  metanet__importance_input=True),
    # the metanetwork epoch chosen on validation curves (visualize), as the shipped config and
    # the final comparison do, instead of the last one: v18 polarises between epochs 9 and 13
    # and has destroyed the networks by the last epoch
    "v20_imp_rel_100_sel": dict(meta_train__lr_milestones=(24,), meta_train__reg=100.0,
                                meta_train__reg_form="relative",
                                metanet__importance_input=True, prune__metanet_epoch=0,
                                visualize__every=2),
    "v21_imp_rel_30_sel": dict(meta_train__lr_milestones=(24,), meta_train__reg=30.0,
                               meta_train__reg_form="relative",
                               metanet__importance_input=True, prune__metanet_epoch=0,
                               visualize__every=2),
    # the share form: push only the least important half of each group, towards zero, so the
    # optimum leaves the other half free (the relative form's optimum is one channel per group)
    "v22_share05_10_sel": dict(meta_train__lr_milestones=(24,), meta_train__reg=10.0,
                               meta_train__reg_form="share:0.5", prune__metanet_epoch=0,
                               visualize__every=2),
    "v23_share05_100_sel": dict(meta_train__lr_milestones=(24,), meta_train__reg=100.0,
                                meta_train__reg_form="share:0.5", prune__metanet_epoch=0,
                                visualize__every=2),
    "v24_share05_1000_sel": dict(meta_train__lr_milestones=(24,), meta_train__reg=1000.0,
                                 meta_train__reg_form="share:0.5", prune__metanet_epoch=0,
                                 visualize__every=2),
    # the reference's classifier scramble in meta-training and when applying the metanetwork
    # (``reference_compat``, docs/design.md 3.2): every network the metanetwork returns has its
    # classifier permuted unless the metanetwork learns to pre-invert it, so the metanetwork can
    # no longer stay an identity map. With v7's settings, and with the reference's balance
    # (reg 10, ratios 0.01, lr 1e-3, v1); the metanetwork epoch chosen on validation curves
    "v25_scramble_v7": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0,
                            reference_compat=True, prune__metanet_epoch=0),
    "v26_scramble_ref": dict(meta_train__lr_milestones=(24,), meta_train__reg=10.0,
                             meta_train__lr=1e-3, metanet__node_res_ratio=0.01,
                             metanet__edge_res_ratio=0.01, reference_compat=True,
                             prune__metanet_epoch=0),
    # v5 and v7 with a per-group floor in the final pruning (Torch-Pruning's max_pruning_ratio:
    # at most 90% of a group's channels removed); the baselines of a search that starts with
    # one of these get the same floor (the search shares the prune settings)
    "v5_floor90": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                       prune__max_pruning_ratio=0.9),
    "v7_floor90": dict(meta_train__lr_milestones=(6,), meta_train__reg=1.0,
                       prune__max_pruning_ratio=0.9),
    # the shipped recipe (v5, metanetwork epoch chosen on validation curves) with round 8's
    # per-group floor for every method: the 5-seed comparison with the floor (docs/results.md)
    "shipped_floor90": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                            prune__metanet_epoch=0, prune__max_pruning_ratio=0.9),
    # the regulariser warmed up (meta_train.reg_warmup_epochs: its strength rises linearly over
    # 20 epochs, the learning rate stays up until epoch 24) with the metanetwork epoch chosen on
    # validation curves every 2 epochs: one run passes every strength below the final one, and
    # validation picks where the networks are easiest to prune. The absolute form at 1 and 10
    # (v3's and the reference's strengths, which collapsed or did nothing at full strength from
    # the start) and the relative form at 100 (v18-v20 polarised, then destroyed the networks);
    # with round 8's floor, so the baselines are round 8's
    "v27_warm_reg1": dict(_SELECTED_FLOOR90, meta_train__lr_milestones=(24,),
                          meta_train__reg=1.0, meta_train__reg_warmup_epochs=20),
    "v28_warm_reg10": dict(_SELECTED_FLOOR90, meta_train__lr_milestones=(24,),
                           meta_train__reg=10.0, meta_train__reg_warmup_epochs=20),
    "v29_warm_rel100": dict(_SELECTED_FLOOR90, meta_train__lr_milestones=(24,),
                            meta_train__reg=100.0, meta_train__reg_form="relative",
                            meta_train__reg_warmup_epochs=20),
    # pruning-aware meta-training (meta_train.prune_aware): the loss also takes the
    # cross-entropy of each transformed data model pruned by group L2 to 6.67x over it (10x
    # overall from the data models' 1.5x) or 4x (6x overall), so the metanetwork is rewarded
    # directly for networks whose pruned form keeps its accuracy; v5 otherwise, with the floor
    "v30_paware10": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=6.67),
    "v31_paware6": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=4.0),
    # the same at 2x over the data models (3x overall), where the networks pruned without a
    # finetune still classify (v30's and v31's pruned cross-entropy stayed at chance)
    "v32_paware3": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=2.0),
    # v32 and v30 with the pruned network's BatchNorm on batch statistics (recalibrated, as
    # after a finetune): with the running ones every pruned network is at chance, v30-v32
    "v33_paware3_bn": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=2.0,
                           meta_train__prune_aware_bn="batch"),
    "v34_paware10_bn": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=6.67,
                            meta_train__prune_aware_bn="batch"),
    # v34 and v33 with the pruned network's loss taken after 10 differentiated SGD steps
    # (lr 0.1; meta_train.prune_aware_steps): the metanetwork is scored on what a short
    # finetune makes of its pruned output, the thing the pipeline's finetune decides
    "v35_unroll10_bn": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=6.67,
                            meta_train__prune_aware_bn="batch", meta_train__prune_aware_steps=10,
                            meta_train__prune_aware_lr=0.1),
    "v36_unroll3_bn": dict(_V5, **_SELECTED_FLOOR90, meta_train__prune_aware=2.0,
                           meta_train__prune_aware_bn="batch", meta_train__prune_aware_steps=10,
                           meta_train__prune_aware_lr=0.1),
    # v35 with the regulariser 10x weaker (0.01): the unrolled term, not the regulariser,
    # shapes the networks
    "v37_unroll10_reg001": dict(_V5, **_SELECTED_FLOOR90, meta_train__reg=0.01,
                                meta_train__prune_aware=6.67, meta_train__prune_aware_bn="batch",
                                meta_train__prune_aware_steps=10, meta_train__prune_aware_lr=0.1),
    # v5 with the data models' BatchNorm on batch statistics in meta-training (as in the finetune
    # that follows and in sparse learning's training): a channel's producer can shrink without
    # moving the loss, only its BatchNorm scale/shift and its readers count (meta_train.bn)
    "v38_batchbn": dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch"),
    # the same with the regulariser 10x stronger (1.0: what shrinks freely is satisfied first)
    "v39_batchbn_reg1": dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch",
                             meta_train__reg=1.0),
    # between v38 and v39 (v39's no-finetune curve moved right of group L2's, at a cost)
    "v41_batchbn_reg03": dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch",
                              meta_train__reg=0.3),
    "v42_batchbn_reg003": dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch",
                               meta_train__reg=0.03),
    # the same with the relative regulariser (only separating a group's channels lowers it)
    "v40_batchbn_rel1": dict(_V5, **_SELECTED_FLOOR90, meta_train__bn="batch",
                             meta_train__reg=1.0, meta_train__reg_form="relative"),
    # the metanetwork taught to make each data model's channel-importance pattern what sparse
    # learning makes of it (meta_train.imitate_sl: the scale-free distance of the group-L2
    # shares to the data model after the `sl` transform), the cross-entropy on batch
    # statistics, the group-norm regulariser nearly off (1e-4), each channel's standing in its
    # group as an input (v12), the learning rate kept until epoch 24
    "v43_imitate100": dict(_V5, **_SELECTED_FLOOR90, meta_train__imitate_sl=100.0,
                           meta_train__bn="batch", meta_train__reg=1e-4,
                           meta_train__lr_milestones=(24,), metanet__importance_input=True),
    "v44_imitate30": dict(_V5, **_SELECTED_FLOOR90, meta_train__imitate_sl=30.0,
                          meta_train__bn="batch", meta_train__reg=1e-4,
                          meta_train__lr_milestones=(24,), metanet__importance_input=True),
    "v45_imitate300": dict(_V5, **_SELECTED_FLOOR90, meta_train__imitate_sl=300.0,
                           meta_train__bn="batch", meta_train__reg=1e-4,
                           meta_train__lr_milestones=(24,), metanet__importance_input=True),
    # v44 and v43 with the reference's metanetwork size (8 x 64; v8): more capacity to make
    # sparse learning's pattern without its damage
    "v46_imitate30_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=30.0),
    "v47_imitate100_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=100.0),
    # v46 at a third of the weight (at 8 x 64, 30 beat 100 by far)
    "v48_imitate10_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=10.0),
    # v48 with twice the data models (16; the first 8 are the search's): does the imitation
    # generalise better to the network it is applied to? Run like v5_dm16
    "v49_imitate10_8x64_dm16": dict(_IMITATE_8X64, meta_train__imitate_sl=10.0,
                                    generate__num_models=16),
    # v48 imitating what the channels carry instead of their weights (meta_train.imitate_on:
    # the shares of each channel's post-ReLU signal; round 14 measured v48's low-importance
    # channels still carrying 20-33% of their group's strongest signal (10th-90th percentile),
    # sparse learning's 0-32%, a third of them silent)
    "v50_imitate_act10_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=10.0,
                                   meta_train__imitate_on="activations"),
    "v51_imitate_act30_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=30.0,
                                   meta_train__imitate_on="activations"),
    "v53_imitate_act100_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=100.0,
                                    meta_train__imitate_on="activations"),
    # both distances: silent channels (v50) whose weights are small too (v48), since group-L2
    # pruning ranks weights (v50's silenced channels kept their kernels: none under 0.1)
    "v52_imitate_both10_8x64": dict(_V52),
    "v54_imitate_both30_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=30.0,
                                    meta_train__imitate_on="both"),
    "v55_imitate_both3_8x64": dict(_IMITATE_8X64, meta_train__imitate_sl=3.0,
                                   meta_train__imitate_on="both"),
    # v52 with round 10's pruned cross-entropy (each transformed data model pruned by group L2
    # to 2x / 4x over it, i.e. ~3x / ~6x over the base network, BatchNorm on batch statistics):
    # v52's networks look like sparse learning's (silent low-importance channels) but do not
    # work without those channels (no-finetune 0.707 at 3x, sparse learning 0.981); this term
    # asks the kept channels to carry the function
    "v56_imitate_both10_paware3": dict(_V52, meta_train__prune_aware=2.0,
                                       meta_train__prune_aware_bn="batch"),
    "v57_imitate_both10_paware6": dict(_V52, meta_train__prune_aware=4.0,
                                       meta_train__prune_aware_bn="batch"),
    # round 16: v52 with one after-pruning finetune epoch for every method (the budget where the
    # no-finetune curves should matter most; the baselines run under it too)
    "v52_imitate_both10_8x64_ft1": dict(_FT1),
    # and three epochs, the learning rate x0.1 for the last (the 10-epoch schedule's shape)
    "v52_imitate_both10_8x64_ft3": dict(_V52, finetune_after_pruning__epochs=3,
                                        finetune_after_pruning__milestones=(2,)),
    # round 17: one epoch, the pruned network before it a keep-best candidate too (every
    # method), at the shipped learning rate and at a tenth of it
    "v52_imitate_both10_8x64_ft1_start": dict(_FT1_START),
    "v52_imitate_both10_8x64_ft1_start_lr1": dict(_FT1_START, finetune_after_pruning__lr=0.001),
    # round 18: the lr-0.001 regime with sparse learning at 0.03 (and 0.003), the strengths
    # round 14 tried: in this regime its validation-best strength (for `sl` and `metanet_sl`)
    "v52_imitate_both10_8x64_ft1_start_lr1_sl03": dict(_FT1_START, finetune_after_pruning__lr=0.001,
                                                       prune__sl__reg=0.03),
    # round 19: two after-pruning epochs (the budget between round 17's one and round 16's three),
    # the pruned network a candidate too, at both learning rates
    "v52_imitate_both10_8x64_ft2_start": dict(_FT2_START),
    "v52_imitate_both10_8x64_ft2_start_lr1": dict(_FT2_START, finetune_after_pruning__lr=0.001),
    # v5 with twice the data models (16; the first 8 are the search's, same seeds): run with
    # compare_methods.py --methods=metanet, since the search shares one data-model set
    "v5_dm16": dict(meta_train__lr_milestones=(6,), meta_train__reg=0.1,
                    generate__num_models=16, prune__metanet_epoch=0),
}


def get_config(arg: str | None = None):
  """configs/digits.py with recipe ``arg`` (a key of ``RECIPES``) applied.

  The search chose the metanetwork epoch as the shipped config does unless a recipe says
  otherwise; it evaluated the last epoch (``prune.metanet_epoch=-1``) for every recipe.
  """
  if arg not in RECIPES:
    raise ValueError(f"unknown recipe {arg!r}; choose from {sorted(RECIPES)}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("_recipe_digits",
                                                os.path.join(root, "configs", "digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.prune.metanet_epoch = -1  # the search scored each recipe's last epoch
  for key, value in RECIPES[arg].items():
    *sections, field = key.split("__")  # a__b__c = c.a.b.c; no "__": a top-level field
    node = c
    for section in sections:
      node = node[section]
    node[field] = value
  return c
