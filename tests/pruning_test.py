"""Pruning engine: reference decisions, schedule properties, materialisation, bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _fixtures
import metaprune_jax as mp
from metaprune_jax.graphs.graph import graph_layout
from metaprune_jax.nets.macs import count_terms, macs_of_counts
from metaprune_jax.prune import pruning

FIX = str(_fixtures.path())  # $METAPRUNE_REFERENCE_FIXTURES (tests/_fixtures.py)
CASES = [("resnet56_c10_pruned", "resnet56", 10, (1, 3, 32, 32)),
         ("vgg19_c100_small", "VGG19", 100, (1, 3, 32, 32)),
         ("resnet50_imagenet_pruned", "resnet50", 1000, (1, 3, 224, 224))]


def _load(case, name, ncls):
  _fixtures.require(case)
  sd = dict(np.load(os.path.join(FIX, case, "model.npz")))
  return mp.import_reference_model(sd, name, ncls)


@pytest.mark.parametrize("case,name,ncls,ins", CASES)
def test_progressive_prune_matches_reference(case, name, ncls, ins):
  arch, v = _load(case, name, ncls)
  ref = json.load(open(os.path.join(FIX, case, "prune_step.json")))
  res = mp.prune_to_target(arch, v, ref["target_speed_up"], ins)
  assert res.steps == ref["steps_taken"]
  assert res.speed_up == pytest.approx(ref["achieved_speed_up"], rel=1e-12)
  small, sv = mp.materialize(arch, v, res.masks)
  widths = [c for _, _, _, c in graph_layout(small).node_sets]
  assert widths == ref["widths_after"]
  assert mp.count_macs(small, ins) == (int(ref["macs_after"]), int(ref["params_after"]))
  # first step: the same channels removed in every group
  hist, _ = mp.pruning_trajectory(arch, v, ins, steps=200)
  groups = {g.root: g for g in mp.pruning_groups(arch)}
  for entry in ref["first_step_groups"]:
    g = groups[entry["root"]]
    removed = np.flatnonzero(np.asarray(hist[g.space][0]) < 0.5)
    assert removed.tolist() == sorted(entry["removed_idxs"]), entry["root"]


def test_schedule_properties_and_no_empty_group():
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  hist, speeds = mp.pruning_trajectory(arch, v)
  assert np.all(np.diff(speeds) >= -1e-6)  # monotone
  for s, h in hist.items():
    assert np.all(h.sum(axis=1) >= 1), s  # never emptied
  target = float(speeds[60])
  res = mp.prune_to_target(arch, v, target)
  assert res.speed_up >= target
  assert speeds[res.steps - 2] < target  # the step before is below the target
  # MACs of the materialised network == MACs counted from the masks
  small, _ = mp.materialize(arch, v, res.masks)
  terms, _ = count_terms(arch, (1, 3, 32, 32))
  counts = [float(np.sum(np.asarray(res.masks[s]))) if s in res.masks else arch.width(s)
            for s in arch.spaces]
  assert mp.count_macs(small)[0] == pytest.approx(float(macs_of_counts(terms, jnp.array(counts))),
                                                  rel=1e-6)


def test_masked_equals_materialized_after_pruning():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(1), (8, 8))
  masks, _ = mp.progressive_prune(arch, v, 1.8, (1, 3, 8, 8))
  mv = mp.mask_variables(arch, v, masks)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
  a = mp.apply_model(arch, mv, x, masks=masks)
  small, sv = mp.materialize(arch, mv, masks)
  b = mp.apply_model(small, sv, x)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jit_equals_eager_step_and_one_compilation():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(3), (8, 8))
  # private: one pruning step, jitted vs eager, is the search's inner loop body; the public
  # functions only run whole schedules (and _search's compilations are what the end counts)
  plan, keep, fixed, params, start = pruning._prepare(arch, v, None, (1, 3, 8, 8), 200, "l2",
                                                      "max")
  sq = pruning._layer_sq(arch, params)
  key = jax.random.PRNGKey(0)
  jitted = jax.jit(lambda sq, keep, s: pruning._step(plan, sq, keep, s, key))
  k_j, k_e = keep, keep
  for s in range(1, 30):
    k_j = jitted(sq, k_j, jnp.int32(s))
    with jax.disable_jit():
      k_e = pruning._step(plan, sq, k_e, s, key)
    for sp in k_j:
      np.testing.assert_array_equal(np.asarray(k_j[sp]), np.asarray(k_e[sp]))
  # repeated searches on other weights reuse one compiled search
  mp.progressive_prune(arch, v, 1.5, (1, 3, 8, 8))
  before = pruning._search._cache_size()  # private (jax's and ours): compilations of the search
  for seed in range(3):
    v2 = mp.init_variables(arch, jax.random.PRNGKey(10 + seed), (8, 8))
    mp.progressive_prune(arch, v2, 1.3 + 0.2 * seed, (1, 3, 8, 8))
  assert pruning._search._cache_size() == before


def test_random_criterion_and_adaptive():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(4), (8, 8))
  m1, s1 = mp.progressive_prune(arch, v, 1.5, (1, 3, 8, 8), criterion="random",
                                rng=jax.random.PRNGKey(1))
  assert s1 >= 1.5
  total = sum(arch.width(s) for s in arch.prunable_spaces)

  def fake_acc(masks):  # accuracy falls with the fraction of channels removed
    return sum(float(np.sum(np.asarray(m))) for m in masks.values()) / total
  best, speed, log = mp.adaptive_prune(arch, v, fake_acc, 0.7, (1, 3, 8, 8))
  assert fake_acc(best) >= 0.7
  assert log[-1][2] < 0.7 or speed == log[-1][1]
  assert speed > 1.0


def test_bad_inputs():
  arch = mp.get_arch("resnet_tiny", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(5), (8, 8))
  with pytest.raises(ValueError, match="must be > 1"):
    mp.progressive_prune(arch, v, 1.0, (1, 3, 8, 8))
  with pytest.raises(ValueError, match="unreachable.*at most"):
    mp.progressive_prune(arch, v, 1e4, (1, 3, 8, 8))
  with pytest.raises(ValueError, match="criterion"):
    mp.progressive_prune(arch, v, 1.5, (1, 3, 8, 8), criterion="taylor")
  with pytest.raises(ValueError, match="normalizer"):
    mp.progressive_prune(arch, v, 1.5, (1, 3, 8, 8), normalizer="sum")
  with pytest.raises(ValueError, match="shape"):
    mp.progressive_prune(arch, v, 1.5, (1, 3, 8, 8), masks={"s1": jnp.ones(3)})
  with pytest.raises(ValueError, match="normalizer"):
    mp.group_importance(arch, v, normalizer="l1")


@pytest.mark.parametrize("case,name,ncls,ins", CASES[:2])
def test_round_to_one_keeps_every_reference_decision(case, name, ncls, ins):
  arch, v = _load(case, name, ncls)
  ref = json.load(open(os.path.join(FIX, case, "prune_step.json")))
  res = mp.prune_to_target(arch, v, ref["target_speed_up"], ins, round_to=1)
  assert res.steps == ref["steps_taken"]
  small, _ = mp.materialize(arch, v, res.masks)
  assert [c for _, _, _, c in graph_layout(small).node_sets] == ref["widths_after"]
  assert mp.count_macs(small, ins) == (int(ref["macs_after"]), int(ref["params_after"]))
  hist, _ = mp.pruning_trajectory(arch, v, ins, steps=200, round_to=1)
  groups = {g.root: g for g in mp.pruning_groups(arch)}
  for entry in ref["first_step_groups"]:
    removed = np.flatnonzero(np.asarray(hist[groups[entry["root"]].space][0]) < 0.5)
    assert removed.tolist() == sorted(entry["removed_idxs"]), entry["root"]


@pytest.mark.parametrize("round_to,target", [(8, 2.3), (16, 2.0)])
def test_round_to_keeps_multiples_and_exact_macs(round_to, target):
  arch = mp.get_arch("resnet56", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  res = mp.prune_to_target(arch, v, target, round_to=round_to)
  small, _ = mp.materialize(arch, v, res.masks)
  for g in mp.pruning_groups(arch):
    assert small.width(g.space) % round_to == 0, (g.space, small.width(g.space))
  assert res.speed_up >= target
  # the reported speed-up is the MACs ratio of the materialised network, counted exactly
  assert res.speed_up == mp.count_macs(arch)[0] / mp.count_macs(small)[0]
  # the trajectory's widths are multiples at every step, its speed-ups exact MACs ratios
  hist, speeds = mp.pruning_trajectory(arch, v, round_to=round_to, steps=40)
  terms, _ = count_terms(arch, (1, 3, 32, 32))
  base = mp.count_macs(arch)[0]
  for i in (0, 19, 39):
    counts = {s: int(np.sum(h[i] > 0.5)) for s, h in hist.items()}
    assert all(c % round_to == 0 for c in counts.values()), counts
    now = mp.count_macs(arch.with_widths(counts))[0]
    assert speeds[i] == pytest.approx(base / now, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -8, 2.5, 8.0, True, "8", None])
def test_round_to_must_be_an_integer_of_at_least_one(bad):
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="round_to must be an integer >= 1"):
    mp.prune_to_target(arch, v, 1.5, round_to=bad)
  with pytest.raises(ValueError, match="round_to must be an integer >= 1"):
    mp.pruning_trajectory(arch, v, round_to=bad)


def test_max_pruning_ratio_keeps_a_floor_in_every_group_and_one_is_the_reference():
  """Torch-Pruning's ``max_pruning_ratio``: no group below ceil((1 - r) * its starting width);
  without it the global schedule empties some groups of resnet20 at 6x down to 1-2 channels;
  r = 1 gives the reference's decisions bit for bit; the MACs are still counted exactly."""
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(3))
  start = {g.space: arch.width(g.space) for g in mp.pruning_groups(arch)}
  free = mp.prune_to_target(arch, v, 6.0)
  free_w = {s: int(np.sum(np.asarray(free.masks[s]) > 0.5)) for s in start}
  r = 0.75
  floor = {s: max(1, int(np.ceil((1 - r) * w - 1e-9))) for s, w in start.items()}
  assert any(free_w[s] < floor[s] for s in start), (free_w, floor)  # the limit binds here
  res = mp.prune_to_target(arch, v, 6.0, max_pruning_ratio=r)
  small, _ = mp.materialize(arch, v, res.masks)
  for s in start:
    assert small.width(s) >= floor[s], (s, small.width(s), floor[s])
  assert res.speed_up >= 6.0
  assert res.speed_up == mp.count_macs(arch)[0] / mp.count_macs(small)[0]
  same = mp.prune_to_target(arch, v, 6.0, max_pruning_ratio=1.0)
  for s in start:
    np.testing.assert_array_equal(same.masks[s], free.masks[s])
  # the trajectory honours it at every step
  hist, _ = mp.pruning_trajectory(arch, v, max_pruning_ratio=r, steps=40)
  for s, h in hist.items():
    assert np.all(np.sum(h > 0.5, axis=1) >= floor[s]), s
  # a floor together with round_to: the floor wins
  both = mp.prune_to_target(arch, v, 3.0, max_pruning_ratio=r, round_to=4)
  small, _ = mp.materialize(arch, v, both.masks)
  assert all(small.width(s) >= floor[s] for s in start)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, True, "0.9", None])
def test_max_pruning_ratio_must_be_in_zero_one(bad):
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"max_pruning_ratio must be a number in \(0, 1\]"):
    mp.prune_to_target(arch, v, 1.5, max_pruning_ratio=bad)
  with pytest.raises(ValueError, match=r"max_pruning_ratio must be a number in \(0, 1\]"):
    mp.pruning_trajectory(arch, v, max_pruning_ratio=bad)
