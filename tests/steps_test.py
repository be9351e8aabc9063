"""Train/eval steps: one compilation, learning, exact zeros under masks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from metaprune_jax.nets import cnn
from metaprune_jax.nets import zoo
from metaprune_jax.prune import masks as masks_lib
from metaprune_jax.runtime import data
from metaprune_jax.runtime import optim
from metaprune_jax.runtime import state as state_lib
from metaprune_jax.runtime import steps

jax.config.update("jax_disable_most_optimizations", True)


def _setup(masked, optimizer="sgd"):
  arch = zoo.get_arch("resnet_tiny", 10)
  variables = jax.jit(cnn.init_variables, static_argnums=(0, 2))(arch, jax.random.PRNGKey(0),
                                                                  (8, 8))
  tx, _ = optim.make_optimizer({"optimizer": optimizer, "lr": 0.05, "momentum": 0.9,
                                "weight_decay": 5e-4}, 10)
  masks = None
  if masked:
    rng = np.random.default_rng(0)
    masks = {s: jnp.asarray((rng.random(arch.width(s)) < 0.5) | (np.arange(arch.width(s)) == 0),
                            jnp.float32) for s in arch.prunable_spaces}
  state = state_lib.create_state(arch, variables, tx, jax.random.PRNGKey(1), masks)
  return arch, tx, state, masks


class StepsTest(absltest.TestCase):

  def test_compiles_once_and_learns(self):
    arch, tx, state, _ = _setup(False)
    ds = data.get_dataset("digits")
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
      return steps.train_step(state, batch, arch=arch, tx=tx)

    fixed = ds.train_batch(32, seed=0, step=0)
    losses = []
    for _ in range(8):  # repeated batch: the loss must fall
      state, m = step(state, fixed)
      losses.append(float(m["loss"]))
    for s in range(1, 4):  # other batches reuse the compilation
      state, m = step(state, ds.train_batch(32, seed=0, step=s))
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertLess(losses[-1], losses[0] * 0.7)
    self.assertEqual(int(state.step), 11)

  def test_sparse_learning_adds_meta_trainings_regulariser_gradient(self):
    """`sl`'s step adds exactly reg * gamma * w on every group slice (the gradient of the
    regulariser meta-training uses, written out independently here)."""
    import optax  # pylint: disable=g-import-not-at-top
    from metaprune_jax.prune import groups as groups_lib  # pylint: disable=g-import-not-at-top
    import importlib  # pylint: disable=g-import-not-at-top
    reg_mod = importlib.import_module("metaprune_jax.prune.regularizer")
    arch, _, state, _ = _setup(False)
    rng = np.random.default_rng(3)  # uneven channel norms, so gamma spans [1, alpha]
    params = jax.tree.map(lambda a: a * jnp.asarray(rng.uniform(0.2, 2.0, a.shape), a.dtype),
                          state.params)
    tx = optax.sgd(1.0)
    state = state.replace(params=params, opt_state=tx.init(params))
    batch = data.get_dataset("digits").train_batch(32, seed=0, step=0)
    alpha, reg = 16.0, 0.01
    plain, _ = steps.train_step(state, batch, arch=arch, tx=tx)
    sl, m = steps.train_step(state, batch, arch=arch, tx=tx, sparsity=(alpha, reg, "max"))
    got = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       plain.params, sl.params)  # lr 1: the regulariser's gradient
    # meta-training's gradient of the same regulariser (metatrain._model_loss_grads)
    meta = jax.grad(lambda th: reg_mod.regularizer(arch, {"params": th}, alpha, reg, "max"))(
        params)
    # reg * gamma * w on every slice of every group, built by hand
    want = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), params)
    gammas = reg_mod.group_gammas(arch, params, alpha, "max")
    for g, gamma in zip(groups_lib.pruning_groups(arch), gammas):
      gamma = np.asarray(gamma, np.float64)
      for mem in g.members:
        p = params[mem.layer]
        if mem.kind == "bn":
          want[mem.layer]["scale"] += reg * gamma * np.asarray(p["scale"])
          continue
        k = np.asarray(p["kernel"], np.float64)
        axis = (3 if mem.role == "out" else 2) if mem.kind == "conv" else (
            1 if mem.role == "out" else 0)
        shape = [1] * k.ndim
        shape[axis] = -1
        want[mem.layer]["kernel"] += reg * gamma.reshape(shape) * k
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(meta), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(b), c, rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-6)
    self.assertGreater(float(m["reg"]), 0.0)
    self.assertGreater(max(float(np.abs(c).max()) for c in jax.tree.leaves(want)), 1e-3)

  def _assert_masked_zero(self, arch, tree, masks, collection):
    reference = masks_lib.mask_tree(arch, tree, masks, collection)
    # Masking is a no-op exactly when every pruned slice is already exactly zero.
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_masked_training_keeps_pruned_channels_zero(self):
    for optimizer in ("sgd", "adamw"):
      arch, tx, state, masks = _setup(True, optimizer)
      ds = data.get_dataset("digits")
      step = jax.jit(functools.partial(steps.train_step, arch=arch, tx=tx))
      for s in range(3):
        state, m = step(state, ds.train_batch(32, seed=0, step=s))
      self.assertTrue(np.isfinite(float(m["loss"])))
      # Params and BN stats are fixed points of masking (pruned slices exactly 0) ...
      self._assert_masked_zero(arch, state.params, masks, "params")
      self._assert_masked_zero(arch, state.batch_stats, masks, "batch_stats")
      # ... and so are the optimizer's per-parameter buffers (momentum / Adam moments).
      buffers = [b for b in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, dict))
                 if isinstance(b, dict) and set(b) == set(state.params)]
      self.assertLen(buffers, 1 if optimizer == "sgd" else 2)
      for b in buffers:
        self._assert_masked_zero(arch, b, masks, "params")
      # The unpruned part did train.
      self.assertGreater(float(jnp.abs(state.params[arch.classifier]["kernel"]).sum()), 0.0)

  def test_eval_step_ignores_padding(self):
    arch, _, state, _ = _setup(False)
    ds = data.get_dataset("digits")
    batch = next(ds.eval_batches(64))
    fn = jax.jit(functools.partial(steps.eval_step, arch=arch))
    full = fn(state.variables, None, batch)
    half = dict(batch, mask=np.where(np.arange(64) < 32, 1.0, 0.0).astype(np.float32))
    part = fn(state.variables, None, half)
    first = fn(state.variables, None, {k: v[:32] for k, v in batch.items()})
    self.assertEqual(float(full["count"]), 64.0)
    np.testing.assert_allclose(float(part["loss_sum"]), float(first["loss_sum"]), rtol=1e-5)
    self.assertEqual(float(part["correct"]), float(first["correct"]))


if __name__ == "__main__":
  absltest.main()
