"""Reference (PyTorch) metanetwork checkpoints: import and export of their state dicts.

The reference's ``MyGNN`` (single edge kind, ``edgeEnc``) and ``MyGNN_resnet50`` (``edgeEnc_<dim>``
per kind) as this package's params: Linear weights are transposed (torch ``[out, in]``, Flax
``[in, out]``), per-layer conv weights stacked on the scanned layer axis; the reference's unused
``mlps`` list and its ``edgeInverter`` buffer are skipped on import and written on export. The
residual ratios are not stored in the reference's checkpoints and must be given
(docs/design.md 4).
"""

import collections
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.metanetwork.config import _Spec, _spec, make_metanet_config


def _get(sd, key, shape):
  if key not in sd:
    raise ValueError(f"reference metanetwork state dict lacks {key!r} (expected shape {shape})")
  arr = np.asarray(sd[key], np.float32)
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"reference key {key!r} has shape {tuple(arr.shape)}, expected "
                     f"{tuple(shape)} for this metanetwork config")
  return arr


def _edge_suffixes(spec: _Spec):
  if len(spec.edge_dims) == 1:
    return [""]
  return [f"_{d}" for d in spec.edge_dims]


def _reference_layout(spec: _Spec):
  """Ordered (reference key, torch shape, params path or None) of the reference state dict."""
  h, out = spec.hidden, []
  out.append(("edgeInverter", (h,), None))
  out.append(("nodeEnc.weight", (h, spec.node_dim), ("node_enc", "kernel")))
  out.append(("nodeEnc.bias", (h,), ("node_enc", "bias")))
  for l in range(spec.num_layers):
    for j in range(1, 5):
      out.append((f"convs.{l}.lin{j}.0.weight", (h, h), ("convs", l, f"lin{j}", "kernel")))
      out.append((f"convs.{l}.lin{j}.0.bias", (h,), ("convs", l, f"lin{j}", "bias")))
    out.append((f"convs.{l}.downlin.weight", (h, 4 * h), ("convs", l, "downlin", "kernel")))
    out.append((f"convs.{l}.downlin.bias", (h,), ("convs", l, "downlin", "bias")))
  for l in range(spec.num_layers):
    out.append((f"mlps.{l}.0.weight", (h, h), None))
    out.append((f"mlps.{l}.0.bias", (h,), None))
  sfx = _edge_suffixes(spec)
  for k, d in enumerate(spec.edge_dims):
    out.append((f"edgeEnc{sfx[k]}.weight", (h, d), (f"edge_enc_{k}", "kernel")))
    out.append((f"edgeEnc{sfx[k]}.bias", (h,), (f"edge_enc_{k}", "bias")))
  for k, d in enumerate(spec.edge_dims):
    for i, name, shape in ((1, "dense1", (h, h)), (3, "dense2", (d, h))):
      out.append((f"edgeDec{sfx[k]}.{i}.weight", shape, (f"edge_dec_{k}", name, "kernel")))
      out.append((f"edgeDec{sfx[k]}.{i}.bias", shape[:1], (f"edge_dec_{k}", name, "bias")))
  for i, name, shape in ((1, "dense1", (h, h)), (3, "dense2", (spec.node_dim, h))):
    out.append((f"nodeDec.{i}.weight", shape, ("node_dec", name, "kernel")))
    out.append((f"nodeDec.{i}.bias", shape[:1], ("node_dec", name, "bias")))
  return out


def import_reference_metanet(state_dict: Mapping[str, Any], node_res_ratio: float,
                             edge_res_ratio: float):
  """Loads a reference (PyTorch) metanetwork state dict.

  Layers, hidden width, node width and edge kinds are inferred from the shapes: the single-kind
  ``MyGNN`` (``edgeEnc``) or the multi-kind ``MyGNN_resnet50`` (``edgeEnc_<dim>``, kinds in the
  state dict's order). ``mlps.*`` and ``edgeInverter`` are ignored.

  Args:
    state_dict: mapping of reference key -> array (numpy or torch-like with ``__array__``).
    node_res_ratio: node residual ratio (not stored in the checkpoint).
    edge_res_ratio: edge residual ratio.

  Returns:
    (config, params); the config's matmul precision is ``'highest'`` (parity with the
    reference).

  Raises:
    ValueError: naming the key and expected shape when something does not fit.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  if "nodeEnc.weight" not in sd:
    raise ValueError("reference metanetwork state dict lacks 'nodeEnc.weight'")
  hidden, node_dim = sd["nodeEnc.weight"].shape
  layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"convs\.(\d+)\.", k)] if m})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"reference state dict has conv layers {layers}; expected convs.0..L-1")
  if "edgeEnc.weight" in sd:
    edge_dims = (int(sd["edgeEnc.weight"].shape[1]),)
  else:
    suffixes = [m.group(1) for k in sd for m in [re.fullmatch(r"edgeEnc_(\d+)\.weight", k)] if m]
    if not suffixes:
      raise ValueError("reference state dict has neither 'edgeEnc.weight' nor "
                       "'edgeEnc_<dim>.weight' keys")
    edge_dims = tuple(int(sd[f"edgeEnc_{s}.weight"].shape[1]) for s in suffixes)
    for s, d in zip(suffixes, edge_dims):
      if int(s) != d:
        raise ValueError(f"reference key 'edgeEnc_{s}.weight' has input width {d}, expected {s}")
  # HIGHEST: a reference metanetwork is imported to reproduce the reference's numbers
  config = make_metanet_config(len(layers), hidden, node_dim, edge_dims, node_res_ratio,
                               edge_res_ratio, precision="highest")
  params = {}
  for key, shape, path in _reference_layout(_spec(config)):
    if path is None:
      continue
    arr = _get(sd, key, shape)
    if path[-1] == "kernel":
      arr = arr.T
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  # Per-layer conv weights are stacked on a leading layer axis (the scanned layer).
  convs = params.pop("convs")
  layers = [convs[l] for l in range(len(convs))]
  params["convs"] = jax.tree_util.tree_map(lambda *a: np.stack(a), *layers)
  return config, jax.tree_util.tree_map(jnp.asarray, params)


def _leaf(params, path):
  """The numpy array at a layout path; ``('convs', l, ...)`` indexes the stacked layer axis."""
  if path[0] == "convs":
    return np.asarray(params["convs"][path[2]][path[3]], np.float32)[path[1]]
  node = params
  for p in path:
    node = node[p]
  return np.asarray(node, np.float32)


def export_reference_metanet(config, params) -> "collections.OrderedDict[str, np.ndarray]":
  """Writes params as the reference state dict (exact inverse of ``import_reference_metanet``).

  ``mlps.*`` (unused by the reference's forward) are written as zeros; ``edgeInverter`` as the
  reference buffer. Also reads gradients that have the structure of params.

  Args:
    config: metanetwork config.
    params: params pytree.

  Returns:
    Ordered dict reference key -> float32 numpy array (torch layout: Linear weight [out, in]).

  Raises:
    ValueError: an unknown matmul precision in ``config``, or ``config.importance_input`` (the
      reference's metanetwork has no such input).
    KeyError: ``params`` lacks a leaf that ``config``'s layout needs (params of another config).
  """
  spec = _spec(config)
  if spec.importance_input:
    raise ValueError("a metanetwork with importance_input=True has no reference counterpart "
                     "(its node encoder reads one more column)")
  h = spec.hidden
  out = collections.OrderedDict()
  for key, shape, path in _reference_layout(spec):
    if path is None:
      if key == "edgeInverter":
        out[key] = np.asarray([1.0] * (h // 2) + [-1.0] * ((h + 1) // 2), np.float32)
      else:
        out[key] = np.zeros(shape, np.float32)
      continue
    arr = _leaf(params, path)
    out[key] = arr.T if path[-1] == "kernel" else arr
  return out
