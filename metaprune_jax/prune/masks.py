"""Channel masks and materialisation.

Masks are one keep-vector per channel space, ``{space: [width] float32}`` (1 keep, 0 pruned);
spaces without an entry are fully kept. During the pruning search and finetuning the network
keeps its full shapes and is masked (:func:`mask_variables` zeroes every slice of a pruned
channel; :func:`metaprune_jax.nets.cnn.apply_model` zeroes its activations), so every step has
static shapes. :func:`materialize` then cuts the kept slices out once, outside jit, giving an
:class:`~metaprune_jax.nets.arch.Arch` at the real widths that computes the masked network's
outputs; :func:`embed` is the reverse.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.nets.arch import CLASSES, INPUT, Arch


def full_masks(arch: Arch) -> dict:
  """All-ones masks for every prunable space (nothing pruned).

  Returns:
    ``{space: [arch.width(space)] float32}`` of ones, one entry per ``arch.prunable_spaces``.
  """
  return {s: jnp.ones((arch.width(s),), jnp.float32) for s in arch.prunable_spaces}


def check_masks(arch: Arch, masks: Mapping) -> None:
  """ValueError for unknown spaces or wrongly shaped masks."""
  for s, m in masks.items():
    if s not in arch.width_map or s in (INPUT, CLASSES):
      raise ValueError(f"{arch.name}: mask for unknown or unprunable space {s!r}")
    if tuple(np.shape(m)) != (arch.width(s),):
      raise ValueError(f"{arch.name}: mask for space {s!r} has shape {tuple(np.shape(m))}, "
                       f"expected ({arch.width(s)},)")


def _leaf_masks(arch: Arch, masks: Mapping) -> dict:
  """Broadcastable multiplier per variable leaf (None when untouched)."""
  out = {"params": {}, "batch_stats": {}}

  def m(space):
    return masks.get(space) if space in masks else None
  for l in arch.layers:
    if l.kind == "conv":
      mi, mo = m(l.in_space), m(l.out_space)
      k = None
      if mi is not None:
        k = mi[None, None, :, None]
      if mo is not None:
        k = mo[None, None, None, :] if k is None else k * mo[None, None, None, :]
      out["params"][l.name] = {"kernel": k}
      if l.bias:
        out["params"][l.name]["bias"] = mo
    elif l.kind == "dense":
      mi, mo = m(l.in_space), m(l.out_space)
      k = None
      if mi is not None:
        k = mi[:, None]
      if mo is not None:
        k = mo[None, :] if k is None else k * mo[None, :]
      out["params"][l.name] = {"kernel": k}
      if l.bias:
        out["params"][l.name]["bias"] = mo
    else:
      mo = m(l.out_space)
      out["params"][l.name] = {"scale": mo, "bias": mo}
      out["batch_stats"][l.name] = {"mean": mo, "var": mo}
  return out


def mask_tree(arch: Arch, tree: Mapping, masks: Mapping, collection: str = "params") -> dict:
  """Zeroes pruned slices of a tree with the structure of ``variables[collection]`` (params,
  gradients, optimizer moments). Jittable."""
  lm = _leaf_masks(arch, masks)[collection]
  out = {}
  for layer, leaves in tree.items():
    out[layer] = {}
    for leaf, a in leaves.items():
      mul = lm.get(layer, {}).get(leaf)
      out[layer][leaf] = a if mul is None else a * mul.astype(a.dtype)
  return out


def mask_variables(arch: Arch, variables: Mapping, masks: Mapping) -> dict:
  """Variables with every slice of a pruned channel set to zero (params and BN statistics).

  Running variances of pruned channels become 0 as well; they are never read unmasked.
  Jittable (``arch`` static).

  Args:
    arch: the architecture at the variables' (full) widths.
    variables: ``{'params', 'batch_stats'}`` (``batch_stats`` optional); other collections are
      passed through.
    masks: ``{space: [arch.width(space)] float}`` keep-vectors (1 keep, 0 pruned); spaces
      without an entry are kept. Not checked here (see :func:`check_masks`).

  Returns:
    A new dict with the same structure and shapes: conv kernels ``[k, k, C_in, C_out]`` and
    dense kernels ``[C_in, C_out]`` zeroed along pruned input and output channels, biases,
    BatchNorm scale/bias and running mean/var ``[C]`` zeroed at pruned channels.
  """
  out = dict(variables)
  out["params"] = mask_tree(arch, variables["params"], masks, "params")
  if "batch_stats" in variables:
    out["batch_stats"] = mask_tree(arch, variables["batch_stats"], masks, "batch_stats")
  return out


def kept_indices(arch: Arch, masks: Mapping) -> dict:
  """``{space: np.ndarray of kept channel indices}`` for every space (host-side)."""
  out = {}
  for s in arch.spaces:
    if s in masks:
      out[s] = np.flatnonzero(np.asarray(masks[s]) > 0.5)
    else:
      out[s] = np.arange(arch.width(s))
  return out


def materialize(arch: Arch, variables: Mapping, masks: Mapping) -> tuple[Arch, dict]:
  """Cuts out the kept channels: ``(arch at the real widths, variables)``. Not jittable.

  Args:
    arch: the architecture at the variables' (full) widths.
    variables: ``{'params', 'batch_stats'}`` at ``arch``'s widths.
    masks: ``{space: [arch.width(space)] float}`` keep-vectors (a channel is kept where the
      mask is > 0.5); spaces without an entry are kept whole.

  Returns:
    ``(small_arch, small_variables)``: ``small_arch`` is ``arch`` with every space at its kept
    count ``C'`` (validated), ``small_variables`` ``{'params', 'batch_stats'}`` holding the
    kept slices (kernels ``[k, k, C_in', C_out']`` / ``[C_in', C_out']``, BatchNorm leaves
    ``[C']``), as jax arrays.

  Raises:
    ValueError: a mask of the wrong shape, or one that removes every channel of a space.
  """
  check_masks(arch, masks)
  keep = kept_indices(arch, masks)
  for s, k in keep.items():
    if len(k) == 0:
      raise ValueError(f"{arch.name}: the mask of space {s!r} removes every channel")
  small = arch.with_widths({s: len(k) for s, k in keep.items()})
  out = {"params": {}, "batch_stats": {}}
  for l in arch.layers:
    p = variables["params"][l.name]
    if l.kind in ("conv", "dense"):
      ki, ko = keep[l.in_space], keep[l.out_space]
      k = np.asarray(p["kernel"])
      k = k[:, :, ki][:, :, :, ko] if l.kind == "conv" else k[ki][:, ko]
      out["params"][l.name] = {"kernel": jnp.asarray(k)}
      if l.bias:
        out["params"][l.name]["bias"] = jnp.asarray(np.asarray(p["bias"])[ko])
    else:
      ko = keep[l.out_space]
      out["params"][l.name] = {"scale": jnp.asarray(np.asarray(p["scale"])[ko]),
                               "bias": jnp.asarray(np.asarray(p["bias"])[ko])}
      st = variables["batch_stats"][l.name]
      out["batch_stats"][l.name] = {"mean": jnp.asarray(np.asarray(st["mean"])[ko]),
                                    "var": jnp.asarray(np.asarray(st["var"])[ko])}
  return small.validate(), out


def embed(full_arch: Arch, small_variables: Mapping, keep: Mapping) -> tuple[dict, dict]:
  """Reverse of :func:`materialize`: puts a small network's variables at the ``keep`` indices
  of ``full_arch`` (zeros elsewhere; BN variances 1 elsewhere). Not jittable.

  Args:
    full_arch: the architecture at full widths.
    small_variables: ``{'params', 'batch_stats'}`` of the small network, each space at
      ``len(keep[space])`` channels.
    keep: ``{space: kept channel indices}`` (int sequences into ``[0, full width)``); spaces
      without an entry are kept whole.

  Returns:
    ``(variables, masks)``: ``{'params', 'batch_stats'}`` at ``full_arch``'s widths (float32)
    and ``{space: [width] float32}`` keep-vectors for every prunable space.

  Raises:
    KeyError: a layer or leaf missing from ``small_variables``.
    ValueError: (numpy's) a leaf whose shape does not fit the ``keep`` counts.
  """
  keep = {s: np.asarray(keep[s]) if s in keep else np.arange(full_arch.width(s))
          for s in full_arch.spaces}
  out = {"params": {}, "batch_stats": {}}
  for l in full_arch.layers:
    p = small_variables["params"][l.name]
    if l.kind in ("conv", "dense"):
      ki, ko = keep[l.in_space], keep[l.out_space]
      shape = full_arch.param_shapes()[l.name]["kernel"]
      k = np.zeros(shape, np.float32)
      if l.kind == "conv":
        k[np.ix_(range(shape[0]), range(shape[1]), ki, ko)] = np.asarray(p["kernel"])
      else:
        k[np.ix_(ki, ko)] = np.asarray(p["kernel"])
      out["params"][l.name] = {"kernel": jnp.asarray(k)}
      if l.bias:
        b = np.zeros(shape[-1], np.float32)
        b[ko] = np.asarray(p["bias"])
        out["params"][l.name]["bias"] = jnp.asarray(b)
    else:
      ko, w = keep[l.out_space], full_arch.width(l.out_space)
      d = {}
      for leaf, fill in (("scale", 0.0), ("bias", 0.0)):
        a = np.full(w, fill, np.float32)
        a[ko] = np.asarray(p[leaf])
        d[leaf] = jnp.asarray(a)
      out["params"][l.name] = d
      st = small_variables["batch_stats"][l.name]
      m_, v_ = np.zeros(w, np.float32), np.ones(w, np.float32)
      m_[ko], v_[ko] = np.asarray(st["mean"]), np.asarray(st["var"])
      out["batch_stats"][l.name] = {"mean": jnp.asarray(m_), "var": jnp.asarray(v_)}
  masks = {}
  for s in full_arch.prunable_spaces:
    m = np.zeros(full_arch.width(s), np.float32)
    m[keep[s]] = 1.0
    masks[s] = jnp.asarray(m)
  return out, masks


def masks_from_keep(arch: Arch, keep: Mapping) -> dict:
  return {s: jnp.asarray(np.isin(np.arange(arch.width(s)), np.asarray(keep[s])), jnp.float32)
          for s in arch.prunable_spaces if s in keep}


__all__ = ["full_masks", "check_masks", "mask_tree", "mask_variables", "kept_indices",
           "materialize", "embed", "masks_from_keep"]

del jax
