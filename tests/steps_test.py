"""Train/eval steps: one compilation, learning, exact zeros under masks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from metaprune_jax import cnn
from metaprune_jax import data
from metaprune_jax import masks as masks_lib
from metaprune_jax import optim
from metaprune_jax import state as state_lib
from metaprune_jax import steps
from metaprune_jax import zoo

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
