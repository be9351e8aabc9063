"""Meta-learning: regulariser, meta-training gradients, static-shape data models, resume."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _fixtures
import _tb_events
from _xla_env import xla_flags
import metaprune_jax as mp
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.modes import meta as meta_modes
from metaprune_jax.prune.regularizer import regularizer
from metaprune_jax.runtime import datamodels
from metaprune_jax.runtime import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = str(_fixtures.path())  # $METAPRUNE_REFERENCE_FIXTURES (tests/_fixtures.py)
CASES = [("resnet56_c10_pruned", "resnet56", 10, 0.01), ("vgg19_c100_small", "VGG19", 100, 0.05),
         ("resnet50_imagenet_pruned", "resnet50", 1000, None)]


def _load(case, name, ncls):
  _fixtures.require(case)
  return mp.import_reference_model(dict(np.load(os.path.join(FIX, case, "model.npz"))), name,
                                   ncls)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("case,name,ncls,_", CASES)
def test_regularizer_gradient_matches_reference(case, name, ncls, _):
  arch, v = _load(case, name, ncls)
  ref = np.load(os.path.join(FIX, case, "regularizer.npz"))
  val, g = jax.value_and_grad(lambda p: regularizer(arch, {"params": p}))(v["params"])
  gsd = mp.export_reference_state_dict(arch, {"params": g})
  keys = [k[5:] for k in ref.files if k.startswith("grad/")]
  assert keys and set(keys) <= set(gsd)
  for k in keys:
    assert _rel(gsd[k], ref["grad/" + k]) <= 1e-5, k
  # R is quadratic with gamma constant: R = 0.5 * sum(grad * w)
  assert float(val) == pytest.approx(float(ref["implied_quadratic_value"]), rel=1e-5)


def test_regularizer_finite_differences_and_degenerate_groups():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0), (8, 8))
  params = v["params"]
  f = lambda p: regularizer(arch, {"params": p}, alpha=4.0, reg=0.5)
  g = jax.grad(f)(params)
  # gamma is a constant: the directional derivative with gamma frozen is sum(g * d)
  from metaprune_jax.prune.regularizer import group_gammas
  gam = group_gammas(arch, params, 4.0)
  d = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
  frozen = lambda p: _frozen_reg(arch, p, gam, 0.5)
  eps = 1e-3
  plus = jax.tree_util.tree_map(lambda a, b: a + eps * b, params, d)
  minus = jax.tree_util.tree_map(lambda a, b: a - eps * b, params, d)
  fd = (float(frozen(plus)) - float(frozen(minus))) / (2 * eps)
  an = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                   jax.tree_util.tree_leaves(d)))
  assert fd == pytest.approx(an, rel=2e-3)
  assert float(frozen(params)) == pytest.approx(float(f(params)), rel=1e-6)
  # a one-channel group: gamma = 1 (the reference gives NaN), nothing NaN anywhere
  small = arch.with_widths({"layer1.0.conv1": 1})
  vs = mp.init_variables(small, jax.random.PRNGKey(2), (8, 8))
  gs = jax.grad(lambda p: regularizer(small, {"params": p}))(vs["params"])
  assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(gs))
  assert np.abs(np.asarray(gs["layer1_0_bn1"]["scale"])).sum() > 0


def _spread_scales_net():
  """resnet_tiny with BatchNorm scales away from 1, so gamma spreads over [1, alpha]."""
  arch = mp.get_arch("resnet_tiny", 10)
  params = mp.init_variables(arch, jax.random.PRNGKey(0), (8, 8))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a * (0.5 + jax.random.uniform(jax.random.PRNGKey(len(str(path))), a.shape))
      if "scale" in str(path[-1]) else a, params)
  return arch, params


def _channel_squares(grp, params):
  """Independent numpy (float64): each channel's summed squares over the group's slices."""
  s = 0.0
  for m in grp.members:
    p = np.asarray(params[m.layer]["scale" if m.kind == "bn" else "kernel"], np.float64)
    if m.kind == "bn":
      s = s + p ** 2
    else:
      axes = ((0, 1, 2) if m.role == "out" else (0, 1, 3)) if m.kind == "conv" else \
          ((0,) if m.role == "out" else (1,))
      s = s + np.sum(p ** 2, axis=axes)
  return s


def test_relative_regularizer_is_scale_invariant_and_moves_norm_between_channels():
  """``form='relative'``: per group the gamma-weighted mean of the channels' summed squares."""
  arch, params = _spread_scales_net()
  f = lambda p: regularizer(arch, {"params": p}, alpha=16.0, reg=0.3, form="relative")
  val, g = jax.value_and_grad(f)(params)
  # independent value: numpy, one group at a time, from the frozen gammas
  from metaprune_jax.prune.regularizer import group_gammas
  gam = group_gammas(arch, params, 16.0)
  want, counted_groups = 0.0, 0
  for grp, gamma in zip(mp.pruning_groups(arch), gam):
    s = _channel_squares(grp, params)
    gamma = np.asarray(gamma, np.float64)
    if np.any(gamma > 0):
      counted_groups += 1
      want += 0.3 * np.sum(gamma * s) / np.sum(s)
  assert counted_groups >= 3
  assert float(val) == pytest.approx(want, rel=1e-5)
  # scaling every weight leaves it unchanged, so the gradient is orthogonal to the weights
  # (Euler), unlike the absolute form's
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, params)
  assert float(f(doubled)) == pytest.approx(float(val), rel=1e-5)
  dot = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                    jax.tree_util.tree_leaves(params)))
  norm = sum(float(jnp.sum(a * a)) for a in jax.tree_util.tree_leaves(g)) ** 0.5
  assert abs(dot) <= 1e-4 * norm * sum(float(jnp.sum(a * a)) for a in
                                       jax.tree_util.tree_leaves(params)) ** 0.5
  g_abs = jax.grad(lambda p: regularizer(arch, {"params": p}, alpha=16.0, reg=0.3))(params)
  assert sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree_util.tree_leaves(g_abs),
                                                   jax.tree_util.tree_leaves(params))) > 0
  # the least important channel of a group is pushed down, the most important one up
  grp = next(gr for gr, ga in zip(mp.pruning_groups(arch), gam) if float(jnp.max(ga)) > 1)
  bn = next(m for m in grp.members if m.kind == "bn")
  gamma = np.asarray(gam[mp.pruning_groups(arch).index(grp)])
  scale, gscale = np.asarray(params[bn.layer]["scale"]), np.asarray(g[bn.layer]["scale"])
  lo, hi = int(np.argmax(gamma)), int(np.argmin(gamma))
  assert gscale[lo] * scale[lo] > 0 > gscale[hi] * scale[hi]
  with pytest.raises(ValueError, match="regulariser form"):
    regularizer(arch, {"params": params}, form="squared")


def test_share_regularizer_pushes_only_the_least_important_share_of_each_group():
  arch, params = _spread_scales_net()
  f = lambda p: regularizer(arch, {"params": p}, alpha=16.0, reg=0.7, form="share:0.5")
  val, g = jax.value_and_grad(f)(params)
  from metaprune_jax.prune.regularizer import group_gammas
  gam = group_gammas(arch, params, 16.0)
  want = 0.0
  for grp, gamma in zip(mp.pruning_groups(arch), gam):
    s = _channel_squares(grp, params)
    gamma = np.asarray(gamma, np.float64)
    kept = gamma > 0
    if not kept.any():
      continue
    n_push = int(np.floor(0.5 * kept.sum()))
    pushed = np.argsort(-gamma, kind="stable")[:n_push]  # least important: the largest gammas
    want += 0.7 * np.sum(s[pushed]) / np.sum(s[kept])
    # only the pushed channels get a gradient, towards zero
    bn = next(m for m in grp.members if m.kind == "bn")
    gs, sc = np.asarray(g[bn.layer]["scale"]), np.asarray(params[bn.layer]["scale"])
    if len({m.layer for m in grp.members if m.kind == "bn"}) == 1:
      others = np.setdiff1d(np.arange(len(gamma)), pushed)
      assert np.all(gs[others] == 0.0)
      assert np.all(gs[pushed] * sc[pushed] > 0)
  assert float(val) == pytest.approx(want, rel=1e-5)
  for bad in ("share:0", "share:1", "share:x", "share"):
    with pytest.raises(ValueError, match="regulariser form"):
      regularizer(arch, {"params": params}, form=bad)


def _frozen_reg(arch, params, gammas, reg):
  total = 0.0
  for grp, gamma in zip(mp.pruning_groups(arch), gammas):
    for m in grp.members:
      p = params[m.layer]
      if m.kind == "bn":
        sq = jnp.square(p["scale"])
      else:
        axes = ((0, 1, 2) if m.role == "out" else (0, 1, 3)) if m.kind == "conv" else \
            ((0,) if m.role == "out" else (1,))
        sq = jnp.sum(jnp.square(p["kernel"]), axis=axes)
      total = total + jnp.sum(gamma * sq)
  return 0.5 * reg * total


@pytest.mark.parametrize("case,name,ncls,ratio", CASES[:2])
def test_meta_train_grads_match_reference(case, name, ncls, ratio):
  arch, v = _load(case, name, ncls)
  cfg, phi = mp.import_reference_metanet(dict(np.load(os.path.join(FIX, case, "metanet.npz"))),
                                         ratio, ratio)
  io = np.load(os.path.join(FIX, case, "io.npz"))
  g = mp.meta_train_grads(cfg, phi, arch, v, io["x"].transpose(0, 2, 3, 1), io["y"],
                          reference_compat=True)
  gsd = mp.export_reference_metanet(cfg, g)
  ref = np.load(os.path.join(FIX, case, "meta_step.npz"))
  for k in ref.files:
    if k.startswith("grad/"):
      assert _rel(gsd[k[5:]], ref[k]) <= 1e-3, k


def _tiny_models(n, seed=0):
  """n data models of resnet_tiny at different random widths (materialised + keep)."""
  full = mp.get_arch("resnet_tiny", 10)
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    v = mp.init_variables(full, jax.random.PRNGKey(100 + i), (8, 8))
    v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
        lambda a: jnp.abs(a + 0.1 * jax.random.normal(jax.random.PRNGKey(i), a.shape)),
        v["batch_stats"])}
    keep = {s: np.sort(rng.choice(full.width(s), rng.integers(2, full.width(s) + 1),
                                  replace=False)) for s in full.prunable_spaces}
    masks = mp.masks.masks_from_keep(full, keep)
    small, sv = mp.materialize(full, v, masks)
    out.append((small, sv, mp.masks.kept_indices(full, masks)))
  return full, out


def test_node_importance_is_the_normalised_group_importance_of_each_node():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(4), (8, 8))
  imp = np.asarray(metanet_lib.node_importance(arch, v["params"]))
  from metaprune_jax.graphs import graph as graph_lib
  from metaprune_jax.prune import groups as groups_lib
  groups = groups_lib.pruning_groups(arch, ignore_classes=False)
  per_space = {g.space: np.asarray(x) for g, x in
               zip(groups, groups_lib.group_importance(arch, v, "max"))}
  sets = graph_lib.graph_layout(arch).node_sets
  assert imp.shape == (graph_lib.graph_layout(arch).num_nodes,)
  checked = 0
  for _, space, start, count in sets:
    want = per_space.get(space, np.ones(count))
    np.testing.assert_allclose(imp[start:start + count], want, rtol=1e-6)
    checked += space in per_space
  assert checked >= 5
  # a metanetwork reading it refuses a call without it
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1, importance_input=True)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="node importances"):
    mp.apply_metanet(mc, phi, mp.to_graph(arch, v))
  with pytest.raises(ValueError, match="no reference counterpart"):
    mp.export_reference_metanet(mc, phi)


@pytest.mark.parametrize("importance_input", [False, True])
def test_padded_slot_path_equals_materialised_and_compiles_once(importance_input):
  """Also with the node-importance input: its masked form (kept channels, full width) must give
  the materialised network's importances."""
  full, models = _tiny_models(2)
  assert models[0][0].widths != models[1][0].widths  # two data models of different widths
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1,
                                       importance_input=importance_input)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  # private: the padded-slot core (one full-width program for data models of every width) is
  # what meta-training jits; the public meta_train_grads runs one model at its own widths
  spec = metatrain._spec(mc)
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 6, 8, 8, 3))
  y = jnp.arange(6) % 10
  f = jax.jit(lambda phi, slot, x, y: metatrain._model_loss_grads(
      spec, full, phi, slot, x, y, 16.0, 10.0, "max")[-1])
  for small, sv, keep in models:
    g_ref = mp.meta_train_grads(mc, phi, small, sv, x[0], y)
    g = f(phi, metatrain.make_slot(full, sv, keep), x, y[None])
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * float(np.max(np.abs(b))) + 1e-8)
  assert f._cache_size() == 1  # one compilation for every width (jax's private counter)
  # the transformed network has the data model's shape and keeps pruned channels at zero
  small, sv, keep = models[0]
  slot = metatrain.make_slot(full, sv, keep)
  new = metatrain.transform_slot(mc, phi, full, slot)
  masked = mp.mask_variables(full, new, slot.masks)
  for a, b in zip(jax.tree_util.tree_leaves(new["params"]),
                  jax.tree_util.tree_leaves(masked["params"])):
    np.testing.assert_array_equal(a, b)


def test_classifier_scramble_masked_equals_materialised():
  """Meta-training under ``reference_compat``: the masked full-width scramble is the one each
  data model gets at its own widths (the kept count decides the permutation), in the kernel and
  in the meta-gradient, with one compilation for every width."""
  full, models = _tiny_models(2, seed=3)
  cls_space = next(l.in_space for l in full.layers if l.name == full.classifier)
  widths = [len(keep[cls_space]) for _, _, keep in models]
  assert len(set(widths)) == 2 and max(widths) < full.width(cls_space)
  for small, sv, keep in models:
    slot = metatrain.make_slot(full, sv, keep)
    fv = mp.mask_variables(full, {"params": jax.tree_util.tree_map(
        jnp.zeros_like, mp.init_variables(full, jax.random.PRNGKey(0), (8, 8))["params"]),
        "batch_stats": slot.batch_stats}, slot.masks)
    # the full-width kernel holding the data model's classifier at its kept rows
    k_full = np.zeros(fv["params"][full.classifier]["kernel"].shape, np.float32)
    k_full[keep[cls_space]] = np.asarray(sv["params"][full.classifier]["kernel"])
    fv["params"][full.classifier] = dict(fv["params"][full.classifier], kernel=jnp.asarray(k_full))
    got = metanet_lib.scramble_classifier(full, fv, slot.masks)["params"][full.classifier]["kernel"]
    want = metanet_lib.scramble_classifier(small, sv)["params"][full.classifier]["kernel"]
    np.testing.assert_array_equal(np.asarray(got)[keep[cls_space]], want)
    assert not np.array_equal(np.asarray(want), np.asarray(sv["params"][full.classifier]["kernel"]))
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(1))
  spec = metatrain._spec(mc)  # private: the padded-slot core that meta-training jits
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 6, 8, 8, 3))
  y = jnp.arange(6) % 10
  f = jax.jit(lambda phi, slot, x, y: metatrain._model_loss_grads(
      spec, full, phi, slot, x, y, 16.0, 10.0, "max", compat=True)[-1])
  for small, sv, keep in models:
    g_ref = mp.meta_train_grads(mc, phi, small, sv, x[0], y, reference_compat=True)
    g_plain = mp.meta_train_grads(mc, phi, small, sv, x[0], y)
    g = f(phi, metatrain.make_slot(full, sv, keep), x, y[None])
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * float(np.max(np.abs(b))) + 1e-8)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_plain))) > 1e-4
  assert f._cache_size() == 1


def _two_model_step_inputs():
  """Two tiny data models stacked as slots, a metanetwork, one batch of 8 images per model:
  ``(full, models, mc, phi, slots, x [2, 1, 8, 8, 8, 3], y [2, 1, 8])``."""
  full, models = _tiny_models(2, seed=1)
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.5, 0.5)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(3))
  slots = metatrain.stack_slots([metatrain.make_slot(full, sv, k) for _, sv, k in models])
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 1, 8, 8, 8, 3))
  y = (jnp.arange(16).reshape(2, 1, 8) % 10).astype(jnp.int32)
  return full, models, mc, phi, slots, x, y


def _mean_model_grad(phi, slots, loss):
  """The mean over the stacked slots of ``jax.grad`` of ``loss(p, slot, i) -> (value, aux)``,
  each model apart (an independent computation of a batched meta-gradient), and the auxes."""
  grads, auxes = [], []
  for i in range(jax.tree_util.tree_leaves(slots)[0].shape[0]):
    slot = jax.tree_util.tree_map(lambda a, i=i: a[i], slots)
    (_, aux), g = jax.value_and_grad(lambda p, slot=slot, i=i: loss(p, slot, i),
                                     has_aux=True)(phi)
    grads.append(g)
    auxes.append(float(aux))
  return jax.tree_util.tree_map(lambda *a: sum(a) / len(a), *grads), auxes


def _assert_grads_close(got, want):
  jax.tree_util.tree_map(lambda u, w: np.testing.assert_allclose(u, w, rtol=2e-4, atol=1e-6),
                         jax.device_get(got), jax.device_get(want))


def test_one_meta_step_lowers_the_loss():
  """Three jitted meta steps lower the loss (each step's metrics are those of the metanetwork
  it starts from, so the fourth call reports the loss after three updates)."""
  full, models, mc, phi, slots, x, y = _two_model_step_inputs()
  spec = metatrain._spec(mc)  # private: make_meta_step takes the hashable spec of the config
  import optax
  from metaprune_jax.runtime import sharding
  tx = optax.adamw(1e-3, weight_decay=0.0)
  step = meta_modes.make_meta_step(spec, full, tx, sharding.make_mesh(), 16.0, 0.01, "max")
  opt = tx.init(phi)
  losses = []
  for _ in range(4):
    phi, opt, m = step(phi, opt, slots, x, y, np.float32(1.0))
    losses.append(float(np.mean(m["loss"])))
  assert losses[-1] < losses[0], losses


def test_reg_warmup_scales_the_strength_and_compiles_once():
  """A step at ``reg_scale`` s is the step of strength ``reg * s`` bit for bit (0: cross-entropy
  alone, checked against the single-model gradient with ``reg=0``); the warm-up's scales rise
  linearly per step and stay 1; every scale runs in one compilation."""
  import optax
  from metaprune_jax.runtime import sharding
  sched = meta_modes.reg_warmup_scale(2, 3)
  np.testing.assert_allclose([sched(k) for k in range(8)],
                             [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0], rtol=1e-6)
  assert [meta_modes.reg_warmup_scale(0, 3)(k) for k in (0, 5)] == [1.0, 1.0]
  assert meta_modes.reg_warmup_scale(1, 1)(0) == 1.0
  full, models, mc, phi, slots, x, y = _two_model_step_inputs()
  spec = metatrain._spec(mc)  # private: make_meta_step takes the hashable spec of the config
  tx = optax.sgd(1.0)  # the update is the negated mean gradient
  mesh = sharding.make_mesh()
  step10 = meta_modes.make_meta_step(spec, full, tx, mesh, 16.0, 10.0, "max")
  step25 = meta_modes.make_meta_step(spec, full, tx, mesh, 16.0, 2.5, "max")
  step0 = meta_modes.make_meta_step(spec, full, tx, mesh, 16.0, 0.0, "max")
  def run(step, s):  # phi and the optimizer state are donated: a fresh copy for every call
    p = jax.tree_util.tree_map(jnp.copy, phi)
    return jax.device_get(step(p, tx.init(p), slots, x, y, np.float32(s)))
  a, b = run(step10, 0.25), run(step25, 1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  np.testing.assert_array_equal(a[2]["reg"], b[2]["reg"])
  c, d = run(step10, 0.0), run(step0, 1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, c, d)
  assert np.all(c[2]["reg"] == 0) and np.all(a[2]["reg"] > 0)
  # cross-entropy alone, from the single-model gradient (a separate jitted function)
  g = [metatrain.meta_train_grads(mc, phi, sm, sv, x[i], y[i], 16.0, 0.0)
       for i, (sm, sv, _) in enumerate(models)]
  want = jax.tree_util.tree_map(lambda p, g0, g1: p - (g0 + g1) / 2, phi, *g)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                         jax.device_get(want), c[0])
  for s in (0.1, 0.5, 0.9):
    run(step10, s)
  assert step10._cache_size() == 1  # pylint: disable=protected-access


def test_batch_bn_meta_gradient_is_the_train_mode_loss_gradient():
  """``bn='batch'``: the meta-gradient is, per model, jax.grad through the metanetwork of the
  transformed network's cross-entropy with BatchNorm on the batch's statistics (training mode)
  plus the regulariser, computed here apart; it differs from the running-statistics gradient;
  an unknown mode is named."""
  from metaprune_jax.prune.regularizer import regularizer
  full, _, mc, phi, slots, x, y = _two_model_step_inputs()
  spec = metatrain._spec(mc)  # private: the hashable spec batched_loss_grads takes
  args = (spec, full, phi, slots, x, y, 16.0, 0.1, "max")
  g_run, _ = jax.jit(lambda: metatrain.batched_loss_grads(*args))()
  g_batch, m_batch = jax.jit(lambda: metatrain.batched_loss_grads(*args, bn="batch"))()

  def loss(p, slot, i):
    th = metatrain.transformed_params(spec, p, full, slot)
    logits, _ = mp.apply_model(full, {"params": th, "batch_stats": slot.batch_stats},
                               x[i, 0], train=True, masks=slot.masks)
    ce = metatrain.cross_entropy(logits, y[i, 0])
    return ce + regularizer(full, {"params": th}, 16.0, 0.1, "max", masks=slot.masks), ce
  want, ces = _mean_model_grad(phi, slots, loss)
  _assert_grads_close(g_batch, want)
  np.testing.assert_allclose(np.asarray(m_batch["ce"]), ces, rtol=1e-5)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(g_run),
                                                            jax.tree_util.tree_leaves(g_batch)))
  assert diff > 1e-4
  with pytest.raises(ValueError, match="bn='train'"):
    metatrain.batched_loss_grads(*args, bn="train")
  # validation in the same mode: a padded batch's padding stays out of the batch statistics
  class Padded:  # eval_batches' contract: valid rows first, then padding (mask 0)
    def eval_batches(self, batch, split):
      assert split == "val"
      yield {"image": np.concatenate([np.asarray(x[0, 0]), np.full((3, 8, 8, 3), 9.0,
                                                                    np.float32)]),
             "label": np.concatenate([np.asarray(y[0, 0]), np.zeros(3, np.int32)]),
             "mask": np.r_[np.ones(8), np.zeros(3)].astype(np.float32)}
  slot0 = jax.tree_util.tree_map(lambda a: a[0], slots)
  loss, acc = meta_modes.validate_metanet(spec, full, phi, [slot0], Padded(), 11, 0, bn="batch")
  th = metatrain.transformed_params(spec, phi, full, slot0)
  logits, _ = mp.apply_model(full, {"params": th, "batch_stats": slot0.batch_stats}, x[0, 0],
                             train=True, masks=slot0.masks)
  np.testing.assert_allclose(loss, float(metatrain.cross_entropy(logits, y[0, 0])), rtol=1e-5)
  np.testing.assert_allclose(acc, float(jnp.mean(jnp.argmax(logits, -1) == y[0, 0])))


def _share_distance_numpy(arch, params, target):
  """The imitation distance written out with numpy over the materialised network's groups."""
  total = 0.0
  for g in mp.pruning_groups(arch):
    sh = []
    for p in (params, target):
      raw = np.zeros(g.width)
      for m in g.members:
        a = np.asarray(p[m.layer]["scale" if m.kind == "bn" else "kernel"], np.float64)
        if m.kind == "bn":
          raw += a ** 2
        elif m.kind == "conv":
          raw += np.sum(a ** 2, axis=(0, 1, 2) if m.role == "out" else (0, 1, 3))
        else:
          raw += np.sum(a ** 2, axis=0 if m.role == "out" else 1)
      raw /= len(g.members)
      sh.append(np.sqrt(raw / raw.sum()))
    total += float(np.sum((sh[0] - sh[1]) ** 2))
  return total


def test_imitation_distance_is_scale_free_and_masked_equals_materialised():
  """``imitation_distance``: 0 against a copy whose every group is scaled uniformly (the
  distance reads how each group's norm is shared, not its size), positive against another
  network, equal to a numpy computation over the materialised network's groups, and the same
  for the embedded (masked, full-width) data model as for the materialised one."""
  full, models = _tiny_models(2, seed=4)
  small, sv, keep = models[0]
  other = jax.tree_util.tree_map(
      lambda a: a * (1.0 + 0.5 * np.sin(np.arange(a.size).reshape(a.shape))), sv)
  want = _share_distance_numpy(small, sv["params"], other["params"])
  assert want > 1e-3
  slot = metatrain.make_slot(full, sv, keep, target=other)
  embedded = graph_lib.unflatten_variables(full, slot.flat)["params"]
  got = float(metatrain.imitation_distance(full, embedded, slot.target, slot.masks))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  own = metatrain.make_slot(small, other, None, target=other)  # materialised: no masks
  np.testing.assert_allclose(float(metatrain.imitation_distance(
      small, sv["params"], own.target)), want, rtol=1e-4)
  scaled = jax.tree_util.tree_map(lambda a: 3.0 * a, sv)
  same = metatrain.make_slot(full, scaled, keep, target=sv)
  assert float(metatrain.imitation_distance(
      full, graph_lib.unflatten_variables(full, same.flat)["params"], same.target,
      same.masks)) < 1e-9


def test_activation_imitation_reads_signals_not_kernel_scale():
  """``activation_imitation_distance``: the first BatchNorm's signal is the RMS of
  ReLU(BatchNorm on batch statistics (conv(x))) computed here apart; shrinking one channel's
  producing kernel 10x (BatchNorm normalises it back) leaves the distance at 0 where the
  weight-share distance moves, shrinking its BatchNorm scale and shift 10x moves it; the
  embedded (masked) data model gives the materialised one's distance."""
  full, models = _tiny_models(2, seed=4)
  small, sv, keep = models[0]
  x = jax.random.normal(jax.random.PRNGKey(7), (16, 8, 8, 3))
  sig = metatrain.bn_signal(small, sv["params"], sv["batch_stats"], None, x)
  conv, bn = small.layers[0].name, small.layers[1].name
  assert small.layers[1].kind == "bn" and small.layers[0].kind == "conv"
  y = jax.lax.conv_general_dilated(x, sv["params"][conv]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  mu, var = jnp.mean(y, (0, 1, 2)), jnp.var(y, (0, 1, 2))
  z = jax.nn.relu((y - mu) / jnp.sqrt(var + 1e-5) * sv["params"][bn]["scale"]
                  + sv["params"][bn]["bias"])
  np.testing.assert_allclose(np.asarray(sig[bn]), np.sqrt(np.mean(np.square(z), (0, 1, 2))),
                             rtol=1e-4, atol=1e-6)

  shrunk_kernel = jax.tree_util.tree_map(np.array, sv["params"])  # writable copies
  shrunk_kernel[conv]["kernel"][..., 0] *= 0.1
  silenced = jax.tree_util.tree_map(np.array, sv["params"])
  for k in ("scale", "bias"):
    silenced[bn][k][0] *= 0.1
  own = metatrain.make_slot(small, sv, None, target=sv)

  def d(p):
    return float(metatrain.activation_imitation_distance(small, p, sv["batch_stats"],
                                                         own.target, x))
  assert d(sv["params"]) < 1e-9
  assert d(shrunk_kernel) < 1e-7
  assert float(metatrain.imitation_distance(small, shrunk_kernel, own.target)) > 1e-4
  assert d(silenced) > 1e-3
  other = {"params": silenced, "batch_stats": sv["batch_stats"]}
  want = float(metatrain.activation_imitation_distance(
      small, sv["params"], sv["batch_stats"], metatrain.make_slot(small, other, None,
                                                                  target=other).target, x))
  slot = metatrain.make_slot(full, sv, keep, target=other)
  embedded = graph_lib.unflatten_variables(full, slot.flat)["params"]
  got = float(metatrain.activation_imitation_distance(full, embedded, slot.batch_stats,
                                                      slot.target, x, slot.masks))
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("imitate_on", ["weights", "activations", "both"])
def test_imitation_meta_gradient_adds_the_weighted_distance_gradient(imitate_on):
  """``imitate=w`` with targets in the slots: the meta-gradient is, per model, jax.grad
  through the metanetwork of the cross-entropy + regulariser + ``w`` times the imitation
  distance (on the weights, or on the activations of the model's first chunk of images),
  computed here apart; the metrics report the distance; ``imitate=0`` is the plain gradient
  bit for bit."""
  full, models, mc, phi, _, x, y = _two_model_step_inputs()
  targets = [jax.tree_util.tree_map(lambda a, i=i: a * (1.0 + 0.3 * np.cos(
      np.arange(a.size).reshape(a.shape) + i)), sv) for i, (_, sv, _) in enumerate(models)]
  slots = metatrain.stack_slots([metatrain.make_slot(full, sv, k, t)
                                 for (_, sv, k), t in zip(models, targets)])
  plain_slots = metatrain.stack_slots([metatrain.make_slot(full, sv, k) for _, sv, k in models])
  spec = metatrain._spec(mc)  # private: the hashable spec batched_loss_grads takes
  args = (spec, full, phi, slots, x, y, 16.0, 0.1, "max")
  g, m = jax.jit(lambda: metatrain.batched_loss_grads(*args, imitate=5.0,
                                                      imitate_on=imitate_on))()
  g_off, m_off = jax.jit(lambda: metatrain.batched_loss_grads(*args))()
  g_plain, _ = jax.jit(lambda: metatrain.batched_loss_grads(
      spec, full, phi, plain_slots, x, y, 16.0, 0.1, "max"))()
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(g_off),
                         jax.device_get(g_plain))
  assert "imitate" not in m_off
  with pytest.raises(ValueError, match="carry no targets"):
    metatrain.batched_loss_grads(spec, full, phi, plain_slots, x, y, 16.0, 0.1, "max",
                                 imitate=5.0)
  with pytest.raises(ValueError, match="imitate_on='activation'"):
    metatrain.batched_loss_grads(*args, imitate=5.0, imitate_on="activation")

  def loss(p, slot, i):
    th = metatrain.transformed_params(spec, p, full, slot)
    logits = mp.apply_model(full, {"params": th, "batch_stats": slot.batch_stats}, x[i, 0],
                            masks=slot.masks)
    d = 0.0
    if imitate_on in ("activations", "both"):  # one batch of 8 images: the first chunk is all
      d = d + metatrain.activation_imitation_distance(full, th, slot.batch_stats, slot.target,
                                                      x[i, 0], slot.masks)
    if imitate_on in ("weights", "both"):
      d = d + metatrain.imitation_distance(full, th, slot.target, slot.masks)
    return (metatrain.cross_entropy(logits, y[i, 0])
            + regularizer(full, {"params": th}, 16.0, 0.1, "max", masks=slot.masks)
            + 5.0 * d), d
  want, ds = _mean_model_grad(phi, slots, loss)
  _assert_grads_close(g, want)
  np.testing.assert_allclose(np.asarray(m["imitate"]), ds, rtol=1e-5)
  assert min(ds) > 1e-3
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                            jax.tree_util.tree_leaves(g_off)))
  assert diff > 1e-5


@pytest.mark.parametrize("bn,steps", [("running", 0), ("batch", 0), ("batch", 2)])
def test_prune_aware_loss_adds_the_pruned_networks_gradient(bn, steps):
  """``prune_aware``: the traced search picks prune_to_target's masks (full width), and the
  meta-gradient is the plain one plus, per model, the gradient of the cross-entropy of the
  transformed network under the masks the search picks for it (computed here apart, with
  jax.grad through the metanetwork; ``batch``: its BatchNorm on batch statistics; ``steps``:
  after that many SGD steps, unrolled here in a Python loop and differentiated through)."""
  lr = 0.3
  from metaprune_jax.prune import pruning
  full, models, mc, phi, slots, x, y = _two_model_step_inputs()
  v = mp.init_variables(full, jax.random.PRNGKey(0), (8, 8))
  for target in (1.5, 3.0):
    want = mp.prune_to_target(full, v, target, (1, 3, 8, 8)).masks
    got = jax.jit(lambda p, t=target: pruning.traced_prune_masks(full, p, None, t,
                                                                 (1, 3, 8, 8)))(v["params"])
    for s in want:
      np.testing.assert_array_equal(np.asarray(got[s]), np.asarray(want[s]), err_msg=s)
  spec = metatrain._spec(mc)  # private: the hashable spec batched_loss_grads takes
  args = (spec, full, phi, slots, x, y, 16.0, 0.1, "max")
  g_plain, m_plain = jax.jit(lambda: metatrain.batched_loss_grads(*args))()
  aware = (2.0, 1.0, bn) + ((steps, lr) if steps else ())
  g_aware, m_aware = jax.jit(lambda: metatrain.batched_loss_grads(*args, prune_aware=aware))()
  extra, ce_extra = [], []
  for i in range(2):
    slot = jax.tree_util.tree_map(lambda a, i=i: a[i], slots)
    theta = metatrain.transformed_params(spec, phi, full, slot)
    pm = pruning.traced_prune_masks(full, theta, slot.masks, 2.0, (1, 3, 8, 8))
    assert sum(float(jnp.sum(pm[s])) for s in pm) < sum(float(jnp.sum(slot.masks[s]))
                                                        for s in pm)

    def ce_of(th, slot=slot, pm=pm, i=i):
      out = mp.apply_model(full, {"params": th, "batch_stats": slot.batch_stats}, x[i, 0],
                           train=bn == "batch", masks=pm)
      return metatrain.cross_entropy(out[0] if bn == "batch" else out, y[i, 0])

    def ce(p, slot=slot, ce_of=ce_of):
      th = metatrain.transformed_params(spec, p, full, slot)
      for _ in range(steps):  # one chunk of 8 images: every step takes it
        d = jax.grad(ce_of)(th)
        th = jax.tree_util.tree_map(lambda a, b: a - lr * b, th, d)
      return ce_of(th)
    c, g = jax.value_and_grad(ce)(phi)
    extra.append(g)
    ce_extra.append(float(c))
  want = jax.tree_util.tree_map(lambda a, b, c: a + (b + c) / 2, g_plain, *extra)
  jax.tree_util.tree_map(lambda u, w: np.testing.assert_allclose(u, w, rtol=2e-4, atol=1e-6),
                         jax.device_get(g_aware), jax.device_get(want))
  np.testing.assert_allclose(np.asarray(m_aware["ce"]), np.asarray(m_plain["ce"]) + ce_extra,
                             rtol=1e-5)


WORKER = textwrap.dedent("""
  import os, sys, numpy as np, jax, jax.numpy as jnp, optax
  sys.path.insert(0, {root!r})
  import metaprune_jax as mp
  from metaprune_jax.metanetwork import metanet as metanet_lib
  from metaprune_jax.metanetwork import metatrain
  from metaprune_jax.modes import meta as meta_modes
  from metaprune_jax.runtime import sharding
  sys.path.insert(0, os.path.join({root!r}, "tests"))
  from meta_test import _tiny_models
  full, models = _tiny_models(8, seed=2)
  mc = metanet_lib.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
  phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
  slots = metatrain.stack_slots([metatrain.make_slot(full, sv, k) for _, sv, k in models])
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (8, 1, 4, 8, 8, 3)))
  y = (np.arange(32).reshape(8, 1, 4) % 10).astype(np.int32)
  tx = optax.adamw(1e-3, weight_decay=5e-4)
  # private _spec: make_meta_step takes the hashable spec of the config
  step = meta_modes.make_meta_step(metatrain._spec(mc), full, tx, sharding.make_mesh(), 16.0, 10.0,
                                   "max")
  phi, opt, m = step(phi, tx.init(phi), slots, x, y, np.float32(1.0))
  leaves = jax.tree_util.tree_leaves(jax.device_get(phi))
  np.savez(sys.argv[1], *leaves)
  print("devices", jax.device_count())
""")


def test_eight_devices_equal_one_device(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(root=ROOT))
  outs = []
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={n}"),
               JAX_PLATFORMS="cpu")
    out = tmp_path / f"phi{n}.npz"
    r = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"devices {n}" in r.stdout
    outs.append(np.load(out))
  for k in outs[0].files:
    np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6)


def _cli(workdir, *overrides, wait=True, env=None):
  cmd = [sys.executable, "-m", "metaprune_jax", f"--config={ROOT}/configs/digits.py",
         f"--workdir={workdir}", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  if wait:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r
  return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          cwd=ROOT)


def _cli_two_processes(workdir, *overrides, wait=True):
  """The same command on 2 local processes (1 CPU device each) joined by jax.distributed."""
  import portpicker  # pylint: disable=g-import-not-at-top

  port = portpicker.pick_unused_port()
  procs = [_cli(workdir, *overrides, wait=False, env={
      "METAPRUNE_MULTIHOST": "1", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
      "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=1")}) for i in range(2)]
  if wait:
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
  return procs


SMALL = ["--config.generate.num_models=2", "--config.generate.train.epochs=2",
         "--config.generate.finetune.epochs=1", "--config.generate.train.batch_size=64",
         "--config.generate.finetune.batch_size=64", "--config.meta_train.epochs=3",
         "--config.meta_train.batch_size=16", "--config.meta_train.batches_per_model=1",
         "--config.meta_train.val_fraction=0.5"]


def _has_checkpoint(run_dir):
  return run_dir.exists() and any(c.name.isdigit() for c in run_dir.iterdir())


def _assert_same_models(ref, run, indices):
  for i in indices:
    a, b = datamodels.load_data_model(str(ref), i), datamodels.load_data_model(str(run), i)
    for x, y in zip(jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(b.variables)):
      np.testing.assert_array_equal(x, y)


def test_generate_on_two_processes_resumes_after_sigkill(tmp_path):
  """Two processes: each trains its own share (model i on process i % 2) on its own device and
  checkpoints it alone; SIGKILLed mid-way (at least one model half-trained) and restarted, they
  store the same models, bit for bit, as one process that ran uninterrupted."""
  ref = tmp_path / "ref"
  _cli(ref, "--config.mode=generate", *SMALL)
  multi = tmp_path / "multi"
  procs = _cli_two_processes(multi, "--config.mode=generate", *SMALL, wait=False)
  ckpts = [multi / "generate" / f"model_{i:05d}" / "train" / "checkpoints" for i in (0, 1)]
  t0 = time.time()
  while time.time() - t0 < 300 and not all(_has_checkpoint(c) for c in ckpts):
    time.sleep(0.2)
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert all(_has_checkpoint(c) for c in ckpts)
  # killed within 0.2 s of the later process's first checkpoint, so that process's model is cut
  # mid-training; the other process may already have finished its model (when it started
  # first), which the restart must then keep rather than train again
  interrupted = {0, 1} - set(datamodels.list_data_models(str(multi)))
  assert interrupted
  _cli_two_processes(multi, "--config.mode=generate", *SMALL)
  assert datamodels.list_data_models(str(multi)) == [0, 1]
  assert [datamodels.load_data_model(str(multi), i).info["process"] for i in (0, 1)] == [0, 1]
  _assert_same_models(ref, multi, (0, 1))


def test_meta_train_on_two_processes_resumes_after_sigkill(tmp_path):
  """meta_train on 2 processes x 1 device (each builds the batches of its own data models),
  SIGKILLed after its first epoch and restarted, ends where 1 process x 2 devices ends."""
  full, models = _tiny_models(3, seed=4)
  ref, run = tmp_path / "ref", tmp_path / "run"
  for root in (ref, run):
    for i, (small, sv, keep) in enumerate(models):
      datamodels.save_data_model(str(root), i, small, sv, keep, {}, full)
  args = ["--config.mode=meta_train", "--config.generate.num_models=3",
          "--config.meta_train.epochs=3", "--config.meta_train.batch_size=8",
          "--config.meta_train.batches_per_model=2", "--config.meta_train.val_fraction=0.34",
          "--config.meta_train.models_per_step=2", "--config.meta_train.eval_batch_size=120",
          "--config.meta_train.val_batches=2"]
  _cli(ref, *args, env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")})
  procs = _cli_two_processes(run, *args, wait=False)
  t0 = time.time()
  while time.time() - t0 < 300 and not meta_modes.metanet_epochs(str(run)):
    time.sleep(0.2)
  for proc in procs:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert 1 <= len(meta_modes.metanet_epochs(str(run))) < 3
  _cli_two_processes(run, *args)
  (_, pa, ea), (_, pb, eb) = (meta_modes.load_metanet(str(r)) for r in (ref, run))
  assert ea == eb == 3
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  ha, hb = ([json.loads(l) for l in open(r / "meta_train" / "metrics.jsonl")] for r in (ref, run))
  assert [h["epoch"] for h in hb] == [1, 2, 3]
  for a, b in zip(ha, hb, strict=True):
    for k in ("train_loss", "val_loss", "val_accuracy"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
  tb = _tb_events.scalars(str(run / "meta_train" / "tb"))
  assert tb == _tb_events.from_records(hb, "epoch")


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="no data models"):
    datamodels.load_data_model_set(str(tmp_path))
  with pytest.raises(ValueError, match="cannot be split"):
    meta_modes.split_models(1, 0.2)
  full, models = _tiny_models(1)
  small, sv, keep = models[0]
  datamodels.save_data_model(str(tmp_path), 0, small, sv, keep, {}, full)
  other = mp.get_arch("resnet20", 10, width_mult=0.25)
  ov = mp.init_variables(other, jax.random.PRNGKey(0), (8, 8))
  datamodels.save_data_model(str(tmp_path), 1, other, ov,
                             {s: np.arange(other.width(s)) for s in other.spaces}, {}, other)
  with pytest.raises(ValueError, match="mix architectures"):
    datamodels.load_data_model_set(str(tmp_path))
  with pytest.raises(ValueError, match="2 complete data models, 5 expected"):
    datamodels.load_data_model_set(str(tmp_path), expected=5)
  os.makedirs(datamodels.model_dir(str(tmp_path), 2) + ".tmp")  # half-written: ignored
  assert datamodels.list_data_models(str(tmp_path)) == [0, 1]


def test_chunked_network_gradient_equals_whole_batches():
  """Scanning a data model's images in chunks changes nothing but the summation order."""
  assert [metatrain.chunk_size(500, c) for c in (0, 50, 64, 100, 600)] == [500, 50, 50, 100, 500]
  assert metatrain.chunk_size(6, 4) == 3 and metatrain.chunk_size(7, 3) == 1
  full, models = _tiny_models(1, seed=3)
  slot = metatrain.make_slot(full, models[0][1], models[0][2])
  theta = mp.init_variables(full, jax.random.PRNGKey(1), (8, 8))["params"]
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 8, 8, 3))
  y = (jnp.arange(12).reshape(2, 6) % 10).astype(jnp.int32)
  f = jax.jit(lambda c: metatrain.network_grads(full, theta, slot.batch_stats, slot.masks, x, y,
                                                c), static_argnums=0)
  g_all, ce_all, acc_all = f(0)
  # the reference's loss: the sum over batches of each batch's mean cross-entropy
  ce_ref = sum(metatrain.cross_entropy(mp.apply_model(
      full, {"params": theta, "batch_stats": slot.batch_stats}, x[b], masks=slot.masks), y[b])
               for b in range(2))
  np.testing.assert_allclose(ce_all, ce_ref, rtol=1e-6)
  for c in (1, 2, 3):
    g, ce, acc = f(c)
    np.testing.assert_allclose(ce, ce_all, rtol=1e-6)
    assert acc == acc_all
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_all)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_meta_train_imitating_sparse_learning_makes_and_checks_its_targets(tmp_path):
  """``meta_train.imitate_sl``: each data model is trained by sparse learning (the regulariser
  in its training, its group norm falling), meta-training logs the distance to those targets,
  and a rerun with another weight or another distance (``imitate_on``) is refused by the
  checkpoint signature, nothing overwritten."""
  from e2e_pipeline_test import tiny_config  # pylint: disable=g-import-not-at-top
  full, models = _tiny_models(2, seed=6)
  for i, (small, sv, keep) in enumerate(models):
    datamodels.save_data_model(str(tmp_path), i, small, sv, keep, {"seed": 7 + i}, full)
  c = tiny_config()
  c.unlock()
  c.arch = "resnet_tiny"
  c.meta_train.batch_size = 8
  c.meta_train.imitate_sl = 10.0
  rec = meta_modes.meta_train(c, str(tmp_path))
  assert rec["train_imitate"] > 0
  for i, (small, sv, _) in enumerate(models):
    run = tmp_path / "meta_train" / "sl_targets" / f"model_{i:05d}"
    hist = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert hist and all(h["train_reg"] > 0 for h in hist)
    _, _, tv, _ = train_lib.load_run(str(run))
    before = regularizer(small, sv, 16.0, 0.01, "max")
    after = regularizer(small, jax.device_get(tv), 16.0, 0.01, "max")
    assert float(after) < float(before)
  saved = sorted(os.listdir(tmp_path / "meta_train" / "checkpoints"))
  c.meta_train.imitate_sl = 20.0
  with pytest.raises(Exception, match="imitate_sl"):
    meta_modes.meta_train(c, str(tmp_path))
  c.meta_train.imitate_sl = 10.0
  c.meta_train.imitate_on = "activations"  # another distance: another run
  with pytest.raises(Exception, match="imitate_on"):
    meta_modes.meta_train(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "meta_train" / "checkpoints")) == saved
