"""Optimizers match PyTorch's update rules, written out by hand."""

import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from metaprune_jax.runtime import optim


def _run(tx, params, grads_seq):
  state = tx.init(params)
  out = []
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params))
  return out


class OptimTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.p0 = rng.normal(size=(5,)).astype(np.float32)
    self.grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(6)]

  def test_sgd_is_torch_coupled_weight_decay(self):
    lr, m, wd, spe = 0.1, 0.9, 5e-4, 2
    sched = optim.multistep_schedule(lr, [1, 2], spe)
    got = _run(optim.sgd(sched, m, wd), jnp.asarray(self.p0), [jnp.asarray(g) for g in self.grads])
    # torch.optim.SGD: d_p = g + wd * p; buf = d_p (first) / m * buf + d_p; p -= lr_epoch * buf.
    p, buf = self.p0.astype(np.float64), None
    for k, g in enumerate(self.grads):
      d = g + wd * p
      buf = d if buf is None else m * buf + d
      p = p - lr * 0.1 ** (k // spe >= 1) * 0.1 ** (k // spe >= 2) * buf
      np.testing.assert_allclose(got[k], p, rtol=1e-5, atol=1e-6)

  def test_adamw_is_torch_adamw(self):
    lr, wd, b1, b2, eps = 1e-2, 5e-4, 0.9, 0.999, 1e-8
    got = _run(optim.adamw(lr, wd), jnp.asarray(self.p0), [jnp.asarray(g) for g in self.grads])
    p = self.p0.astype(np.float64)
    mu, nu = np.zeros_like(p), np.zeros_like(p)
    for k, g in enumerate(self.grads, start=1):
      p = p * (1 - lr * wd)
      mu = b1 * mu + (1 - b1) * g
      nu = b2 * nu + (1 - b2) * g * g
      p = p - lr * (mu / (1 - b1**k)) / (np.sqrt(nu / (1 - b2**k)) + eps)
      np.testing.assert_allclose(got[k - 1], p, rtol=1e-5, atol=1e-6)

  def test_multistep_schedule_boundaries(self):
    s = optim.multistep_schedule(0.1, [2, 3], steps_per_epoch=10)
    lrs = [float(s(i)) for i in (0, 19, 20, 29, 30, 100)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)

  def test_make_optimizer_unknown(self):
    with self.assertRaisesRegex(ValueError, "Unknown optimizer 'lamb'"):
      optim.make_optimizer({"optimizer": "lamb", "lr": 0.1}, 10)


if __name__ == "__main__":
  absltest.main()
