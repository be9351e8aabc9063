"""The benchmarks' PyTorch twin (``benchmarks/pruning.py::_torch_net``, which times the
reference's framework beside ours in ``pruning.py`` and ``device_check.py``) computes what our
network computes, also for flax's asymmetric 'SAME' padding (stride-2 convolutions and pools on
even maps pad (0, 1)) and mid-network average pooling. Skipped without torch (an optional
extra)."""

import os
import sys

import jax
import numpy as np
import pytest

import metaprune_jax as mp
from metaprune_jax.nets import cnn
from metaprune_jax.nets.arch import pad_pairs
from metaprune_jax.nets.trace import from_flax
from tests.trace_ops_test import NETS
from tests.trace_test import _setup

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
from pruning import _torch_net  # noqa: E402  pylint: disable=g-import-not-at-top


def _torch_logits(arch, variables, x):
  _, net = _torch_net(arch, variables)
  xt = torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy())
  with torch.no_grad():
    return net(xt).numpy()


@pytest.mark.parametrize("net", ["same_resnet", "avgpool", "flat_vgg"])
def test_twin_equals_our_network(net):
  m = NETS[net]()
  x, v = _setup(m, hw=16)
  arch, ours = from_flax(m, v, x)
  # the case the twin used to get wrong: a layer or pool padded differently on its two sides
  pads = [pad_pairs(l.padding) for l in arch.layers if l.kind == "conv"]
  pads += [pad_pairs(o.padding) for o in arch.ops if o.op in ("maxpool", "avgpool")]
  if net != "flat_vgg":
    assert any(t != b or l != r for (t, b), (l, r) in pads)
  np.testing.assert_allclose(_torch_logits(arch, ours, x), cnn.apply_model(arch, ours, x),
                             atol=2e-5, rtol=2e-5)


def test_twin_equals_resnet56_and_refuses_ops_it_lacks():
  arch = mp.get_arch("resnet56", 10)
  v = mp.init_variables(arch, jax.random.PRNGKey(0), (32, 32))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  np.testing.assert_allclose(_torch_logits(arch, v, x), cnn.apply_model(arch, v, x),
                             atol=2e-4, rtol=2e-4)
  m = NETS["activations"]()
  xa, va = _setup(m, hw=16)
  arch_a, ours_a = from_flax(m, va, xa)
  if any(o.op == "act" for o in arch_a.ops):
    with pytest.raises(NotImplementedError, match="'act'"):
      _torch_logits(arch_a, ours_a, xa)
