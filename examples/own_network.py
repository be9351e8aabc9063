"""Prune your own flax.linen ResNet: trace it, prune it to 2x fewer MACs, finetune, save it back.

  PYTHONPATH=. python examples/own_network.py --workdir=/tmp/own_network [--epochs=8]

Runs on the embedded digits set (8x8 images, CPU, a few minutes). docs/own_network.md walks
through it.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metaprune_jax import (apply_model, count_macs, evaluate, fit, get_dataset, mask_variables,
                           materialize, prune_to_target)
from metaprune_jax.nets.trace import from_flax, to_flax_variables

ModuleDef = Any


# ---------------------------------------------------------------------------------------------
# 1. A plain flax.linen ResNet, in the style of the flax examples (examples/imagenet/models.py).
#    Padding is written PyTorch-style (padding=1 for 3x3) so the network pads as the
#    reference's ResNets do; flax's default 'SAME' (which pads a stride-2 conv on an even input
#    by (0, 1)) traces as well.
#    Widths are attributes, so the pruned network can be built again at its new widths.
# ---------------------------------------------------------------------------------------------
class ResNetBlock(nn.Module):
  filters: int
  inner: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.inner, (3, 3), self.strides, padding=1)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    y = self.norm()(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  num_classes: int
  stem: int = 16
  filters: Sequence[int] = (16, 32)  # one width per stage
  inner: Sequence[Sequence[int]] = ((16, 16), (32, 32))  # one width per block
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    x = conv(self.stem, (3, 3), padding=1, name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    for i, (f, blocks) in enumerate(zip(self.filters, self.inner)):
      for j, inner in enumerate(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(f, inner, conv=conv, norm=norm, act=self.act, strides=strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def widths_of(arch, model: ResNet) -> ResNet:
  """``model`` rebuilt at the widths of a (pruned) traced ``arch``."""
  def w(layer):
    return arch.width(arch.layer(layer).out_space)
  filters, inner, b = [], [], 0
  for blocks in model.inner:
    inner.append(tuple(w(f"ResNetBlock_{b + j}_Conv_0") for j in range(len(blocks))))
    filters.append(w(f"ResNetBlock_{b}_Conv_1"))
    b += len(blocks)
  return model.clone(stem=w("conv_init"), filters=tuple(filters), inner=tuple(inner))


def main(workdir: str, epochs: int):
  ds = get_dataset("digits")
  h, w_ = ds.spec.image_hw
  model = ResNet(num_classes=ds.spec.num_classes)
  x = jnp.zeros((1, h, w_, 3), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)

  # 2. Trace: the description of the network, and our view of its variables.
  arch, ours = from_flax(model, variables, x, train=False)
  macs, params = count_macs(arch, (1, 3, h, w_))
  print(f"traced: {len(arch.layers)} layers, {len(arch.prunable_spaces)} channel spaces, "
        f"{macs} MACs, {params} parameters")

  schedule = ml_collections.ConfigDict(dict(
      epochs=epochs, batch_size=64, eval_batch_size=120, optimizer="sgd", lr=0.05,
      milestones=(epochs // 2,), gamma=0.1, momentum=0.9, weight_decay=5e-4, keep="last",
      ckpt_every_steps=0, max_to_keep=1))

  # 3. Train it (your own training loop works as well: trace the trained variables instead).
  trained = fit(schedule, arch, ours, None, ds, os.path.join(workdir, "train")).variables
  acc = evaluate(arch, trained, None, ds, 120)["accuracy"]
  print(f"trained: test accuracy {acc:.4f}")

  # 4. Prune to 2x fewer MACs (group L2, the reference's progressive schedule) and finetune
  #    the masked network.
  pruned = prune_to_target(arch, trained, 2.0, (1, 3, h, w_))
  masked = mask_variables(arch, trained, pruned.masks)
  print(f"pruned: {pruned.speed_up:.2f}x, test accuracy "
        f"{evaluate(arch, masked, pruned.masks, ds, 120)['accuracy']:.4f}")
  tuned = fit(schedule, arch, masked, pruned.masks, ds, os.path.join(workdir, "finetune"))
  acc = evaluate(arch, tuned.variables, pruned.masks, ds, 120)["accuracy"]
  print(f"finetuned: test accuracy {acc:.4f}")

  # 5. Cut the pruned channels out and put the arrays back into the model's own tree.
  small, small_vars = materialize(arch, tuned.variables, pruned.masks)
  small_model = widths_of(small, model)
  small_tree = to_flax_variables(small, small_vars, like=variables)
  batch = next(iter(ds.eval_batches(120)))["image"]
  mine = small_model.apply(small_tree, batch, train=False)
  np.testing.assert_allclose(mine, apply_model(small, small_vars, batch), atol=1e-4, rtol=1e-4)
  print(f"saved back: {small_model.stem}/{small_model.filters}/{small_model.inner} channels, "
        f"{count_macs(small, (1, 3, h, w_))[0]} MACs; its own module computes the same logits")
  return small_model, small_tree


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/own_network")
  parser.add_argument("--epochs", type=int, default=8)
  args = parser.parse_args()
  main(args.workdir, args.epochs)
