"""Pruning groups and group importance (docs/design.md section 6, Torch-Pruning 1.6 semantics).

A group is one prunable channel space with every layer slice that carries it: the output rows
of each conv/dense writing the space, each BatchNorm normalising it, and the input columns of
each conv/dense reading it. Residual joins put a whole stage (stem or projection shortcut and
every block's last conv) in one group; each block's inner convs form their own group.

Order: Torch-Pruning lists groups by walking the autograd graph from the logits depth-first
(a stack; a node's inputs are created in operand order and the last one pushed is explored
first, so the shortcut operand of ``out + shortcut`` is followed before the main branch), and
yields a group for each conv/linear in the order they were first seen, skipping layers already
covered. :func:`pruning_groups` simulates that walk on ``arch.ops``, so group ``i`` here is
group ``i`` of the reference's ``importance.npz``, ``regularize`` and pruning steps.

Ignored layers: any conv/dense whose output count equals the number of classes (the classifier,
and a conv pruned to exactly that many channels); its whole group is dropped from pruning.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from metaprune_jax.nets.arch import CLASSES, INPUT, Arch

NORMALIZERS = ("max", "mean", "none")


@dataclasses.dataclass(frozen=True)
class Member:
  """One slice of a group: ``role`` is ``out`` (conv/dense output rows; bn for BatchNorm) or
  ``in`` (conv/dense input columns). ``layer`` is the parameter key, ``ref`` the reference's."""

  layer: str
  ref: str
  kind: str
  role: str


@dataclasses.dataclass(frozen=True)
class Group:
  """A prunable channel space.

  Attributes:
    space: the channel space (``arch.width(space)`` channels).
    root: reference name of the layer Torch-Pruning roots the group at.
    members: every coupled slice (see :class:`Member`), in ``arch.layers`` order.
    width: number of channels.
  """

  space: str
  root: str
  members: tuple[Member, ...]
  width: int


def _members(arch: Arch, space: str) -> tuple[Member, ...]:
  out = []
  for l in arch.layers:
    if l.out_space == space:
      out.append(Member(l.name, l.ref, l.kind, "out"))
    if l.kind != "bn" and l.in_space == space:
      out.append(Member(l.name, l.ref, l.kind, "in"))
  return tuple(out)


def is_ignored(arch: Arch, layer_name: str) -> bool:
  l = arch.layer(layer_name)
  return l.kind in ("conv", "dense") and arch.width(l.out_space) == arch.num_classes


@functools.lru_cache(maxsize=256)
def pruning_groups(arch: Arch, ignore_classes: bool = True) -> tuple[Group, ...]:
  """The prunable groups of ``arch`` in Torch-Pruning's order (module docstring).

  Args:
    arch: the architecture (groups are cached per ``arch``).
    ignore_classes: ``True`` (Torch-Pruning's default) leaves out the groups whose layers have
      exactly ``num_classes`` outputs; ``False`` keeps them (for callers that decide that per
      data model, on masked full-width networks).

  Returns:
    A tuple of :class:`Group`, one per prunable channel space; ``group.width`` is that space's
    channel count ``C`` (the length of its ``[C]`` mask and importance vector). The ``input``
    and ``classes`` spaces never form a group.
  """
  producer = {op.output: op for op in arch.ops}
  final = arch.ops[-1]
  seen, order = set(), []

  def create(op):
    if op.output not in seen:
      seen.add(op.output)
      order.append(op)
  visited = set()
  create(final)
  stack = [final]
  while stack:
    op = stack.pop()
    if op.output in visited:
      continue
    for t in op.inputs:
      if t in producer:
        create(producer[t])
        stack.append(producer[t])
    visited.add(op.output)
  roots = [op.layer for op in order if op.op in ("conv", "dense")]
  covered, groups = set(), []
  for name in roots:
    l = arch.layer(name)
    if l.out_space in (CLASSES, INPUT) or name in covered or (
        ignore_classes and is_ignored(arch, name)):
      continue
    members = _members(arch, l.out_space)
    outs = [m.layer for m in members if m.role == "out" and m.kind != "bn"]
    covered.update(outs)
    if ignore_classes and any(is_ignored(arch, m) for m in outs):
      continue
    groups.append(Group(l.out_space, l.ref, members, arch.width(l.out_space)))
  return tuple(groups)


def kept_as_group(arch: Arch, group: Group, masks: Mapping) -> jax.Array:
  """Whether ``group`` of a masked (embedded) network is a pruning group of the materialised
  network: not when exactly ``num_classes`` of its channels are kept (:func:`pruning_groups`
  skips such groups there). A traced boolean scalar; ``masks``: ``{space: [width]}``."""
  return jnp.sum(masks[group.space] > 0) != arch.num_classes


def _member_sq(arch: Arch, params: Mapping, m: Member) -> jax.Array:
  """Per-channel squared L2 norm of one member's slice, ``[width]``."""
  p = params[m.layer]
  if m.kind == "bn":
    return jnp.square(p["scale"])
  k = p["kernel"]
  if m.kind == "conv":  # HWIO
    axes = (0, 1, 2) if m.role == "out" else (0, 1, 3)
  else:  # dense [in, out]
    axes = (0,) if m.role == "out" else (1,)
  return jnp.sum(jnp.square(k), axis=axes)


def raw_group_importance(arch: Arch, params: Mapping, group: Group) -> jax.Array:
  """Group-L2 importance before normalisation: mean over members of the squared slices."""
  total = sum(_member_sq(arch, params, m) for m in group.members)
  return total / len(group.members)


def normalize(imp: jax.Array, normalizer: str) -> jax.Array:
  if normalizer == "max":
    return imp / jnp.max(imp)
  if normalizer == "mean":
    return imp / jnp.mean(imp)
  if normalizer in ("none", None):
    return imp
  raise ValueError(f"unknown normalizer {normalizer!r}; choose from {NORMALIZERS}")


def group_importance(arch: Arch, variables: Mapping, normalizer: str = "max") -> list:
  """Per-group channel importance, in :func:`pruning_groups` order.

  Args:
    arch: the architecture.
    variables: ``{'params', ...}`` (or a bare params tree).
    normalizer: ``max`` (the reference), ``mean`` or ``none``.

  Returns:
    list of ``[group.width] float32`` arrays. Jittable (``arch`` static).

  Raises:
    ValueError: an unknown normalizer.
  """
  if normalizer not in NORMALIZERS and normalizer is not None:
    raise ValueError(f"unknown normalizer {normalizer!r}; choose from {NORMALIZERS}")
  params = variables["params"] if "params" in variables else variables
  return [normalize(raw_group_importance(arch, params, g), normalizer)
          for g in pruning_groups(arch)]
