"""fold_batchnorm (metaprune_jax/nets/inference.py): the folded network computes the unfolded one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaprune_jax as mp
from metaprune_jax.nets import inference


def _with_random_stats(arch, seed):
  """Fresh variables with non-trivial BatchNorm scale, bias and running statistics."""
  v = mp.init_variables(arch, jax.random.PRNGKey(seed))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 4 * len(arch.layers)))
  params = dict(v["params"])
  stats = {}
  for l in arch.layers:
    if l.kind == "bn":
      c = arch.width(l.out_space)
      params[l.name] = {"scale": 1 + 0.3 * jax.random.normal(next(keys), (c,)),
                        "bias": 0.2 * jax.random.normal(next(keys), (c,))}
      stats[l.name] = {"mean": 0.5 * jax.random.normal(next(keys), (c,)),
                       "var": jax.random.uniform(next(keys), (c,), minval=0.2, maxval=3.0)}
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("name,ncls,target", [("resnet56", 10, 2.3), ("vgg19", 100, 3.0)])
def test_folded_network_equals_unfolded(name, ncls, target):
  arch = mp.get_arch(name, ncls)
  v = _with_random_stats(arch, 0)
  res = mp.prune_to_target(arch, v, target)
  small, sv = mp.materialize(arch, v, res.masks)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  for a, vv in ((arch, v), (small, sv)):
    fa, fv = inference.fold_batchnorm(a, vv)
    assert not any(l.kind == "bn" for l in fa.layers)
    assert not any(op.op == "bn" for op in fa.ops)
    assert fa.widths == a.widths
    want = np.asarray(mp.apply_model(a, vv, x))
    got = np.asarray(mp.apply_model(fa, fv, x))
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
  # the folded network counts fewer MACs (no BatchNorm passes), the same convolutions
  assert mp.count_macs(fa)[0] < mp.count_macs(small)[0]


def test_bad_networks_are_named():
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  fa, fv = inference.fold_batchnorm(arch, v)
  with pytest.raises(ValueError, match="no BatchNorm after a convolution"):
    inference.fold_batchnorm(fa, fv)
  # a BatchNorm that reads a ReLU's output
  ops = list(arch.ops)
  i = next(i for i, op in enumerate(ops) if op.op == "bn" and i > 3)
  relu = next(op for op in ops[:i] if op.op == "relu")
  ops[i] = dataclasses.replace(ops[i], inputs=(relu.output,))
  bad = dataclasses.replace(arch, ops=tuple(ops))
  with pytest.raises(ValueError, match=f"BatchNorm {ops[i].layer} .* reads a relu op"):
    inference.fold_batchnorm(bad, v)


@pytest.mark.parametrize("multiple", [8, 16])
def test_padded_network_equals_unpadded(multiple):
  """pad_channels keeps the function: unfolded (random BatchNorm statistics) and folded."""
  arch = mp.get_arch("resnet56", 10)
  v = _with_random_stats(arch, 0)
  res = mp.prune_to_target(arch, v, 2.3)
  small, sv = mp.materialize(arch, v, res.masks)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
  want = np.asarray(mp.apply_model(small, sv, x))
  assert any(w % multiple for w in small.width_map.values())  # something to pad
  for a, vv in ((small, sv), inference.fold_batchnorm(small, sv)):
    pa, pv = inference.pad_channels(a, vv, multiple)
    for s, w in a.width_map.items():
      if s in a.prunable_spaces:
        assert pa.width(s) % multiple == 0 and w <= pa.width(s) < w + multiple, s
      else:  # the input image and the classes keep their widths
        assert pa.width(s) == w, s
    got = np.asarray(mp.apply_model(pa, pv, x))
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
    assert mp.count_macs(pa)[0] > mp.count_macs(a)[0]  # padding costs MACs, on paper


def test_pad_channels_bad_multiples_and_identity():
  arch = mp.get_arch("resnet20", 10, width_mult=0.5)
  v = mp.init_variables(arch, jax.random.PRNGKey(0))
  for bad in (0, -8, 2.5, True, "8"):
    with pytest.raises(ValueError, match="multiple must be a positive integer"):
      inference.pad_channels(arch, v, bad)
  pa, pv = inference.pad_channels(arch, v, 1)
  assert pa == arch
  jax.tree.map(np.testing.assert_array_equal, pv, v)


def test_inference_form_pads_as_the_backend_wants(monkeypatch):
  """CPU: folded only; a GPU's choice (8, forced on the CPU): folded, padded, same outputs."""
  from metaprune_jax.backends import xla_hints  # pylint: disable=import-outside-toplevel
  arch = mp.get_arch("resnet56", 10)
  v = _with_random_stats(arch, 1)
  small, sv = mp.materialize(arch, v, mp.prune_to_target(arch, v, 2.3).masks)
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 32, 32, 3))
  want = np.asarray(mp.apply_model(small, sv, x))
  assert xla_hints.inference_channel_multiple("cpu") == 1
  assert xla_hints.inference_channel_multiple("tpu") == 1
  assert xla_hints.inference_channel_multiple("gpu") == 8
  with xla_hints.backend_tuning("none"):  # plain JAX: the network as pruned, everywhere
    assert xla_hints.inference_channel_multiple("gpu") == 1
  fa, _ = inference.inference_form(small, sv)
  assert fa == inference.fold_batchnorm(small, sv)[0]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ga, gv = inference.inference_form(small, sv)
  assert not any(l.kind == "bn" for l in ga.layers)
  assert all(ga.width(s) % 8 == 0 for s in ga.prunable_spaces)
  monkeypatch.undo()
  got = np.asarray(mp.apply_model(ga, gv, x))
  assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))
