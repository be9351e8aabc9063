"""Import and export of the reference implementation's PyTorch state dicts.

A state dict (a mapping of numpy arrays with the reference's key names, in PyTorch's order,
with or without ``num_batches_tracked``) becomes ``(arch, variables)`` with the widths read
off the shapes, and back. Layouts: conv OIHW <-> HWIO, Linear ``[out, in]`` <-> ``[in, out]``;
both are exact transposes. ``.pth`` files are read with torch when it is installed (an
optional extra); a pickled whole module must first be turned into ``module.state_dict()``.
"""

from __future__ import annotations

import collections
import pickle
from typing import Mapping

import numpy as np

from metaprune_jax.nets import zoo
from metaprune_jax.nets.arch import Arch

# reference model name -> zoo name
_REF_NAMES = {"resnet56": "resnet56", "resnet110": "resnet110", "vgg19": "vgg19",
              "resnet50": "resnet50", "resnet20": "resnet20", "resnet32": "resnet32",
              "resnet8": "resnet8", "resnet26": "resnet26"}


def _zoo_name(arch_name: str) -> str:
  key = arch_name.lower().replace("_bn", "").replace("-", "")
  if key not in _REF_NAMES:
    raise ValueError(f"unknown reference model {arch_name!r}; known: {sorted(_REF_NAMES)}")
  return _REF_NAMES[key]


def _expected_keys(arch: Arch, with_nbt: bool):
  """``[(key, layer, leaf)]`` in state-dict order; leaf None for num_batches_tracked."""
  keys = []
  for l in arch.layers:
    if l.kind in ("conv", "dense"):
      keys.append((f"{l.ref}.weight", l.name, "kernel"))
      if l.bias:
        keys.append((f"{l.ref}.bias", l.name, "bias"))
    else:
      keys += [(f"{l.ref}.weight", l.name, "scale"), (f"{l.ref}.bias", l.name, "bias"),
               (f"{l.ref}.running_mean", l.name, "mean"), (f"{l.ref}.running_var", l.name, "var")]
      if with_nbt:
        keys.append((f"{l.ref}.num_batches_tracked", l.name, None))
  return keys


def load_state_dict_file(path: str, trusted: bool = False
                         ) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a ``.pth``/``.pt`` state dict (needs torch) or an ``.npz`` into numpy arrays.

  ``.pth`` files are read with ``torch.load(weights_only=True)``, which loads tensors and
  containers but runs no code from the file. A whole pickled module (what the reference saves)
  is refused unless ``trusted=True``: unpickling it runs code from the file and needs the
  reference's classes importable; its ``state_dict()`` is then taken.

  Raises:
    ImportError: a ``.pth`` file without torch installed.
    ValueError: a file that holds no state dict, or a pickled module without ``trusted``.
  """
  if str(path).endswith(".npz"):
    with np.load(path) as z:
      return collections.OrderedDict((k, z[k]) for k in z.files)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading a .pth file needs torch: pip install torch==2.13.0") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=not trusted)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path}: not a plain state dict (a pickled module or other objects; torch said: "
        f"{str(e).splitlines()[0]}). Save module.state_dict() instead, or, for a file you "
        "trust, pass trusted=True (runs the file's pickled code)") from e
  if hasattr(sd, "state_dict"):
    sd = sd.state_dict()
  if not isinstance(sd, Mapping) or not all(hasattr(v, "detach") for v in sd.values()):
    raise ValueError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
  return collections.OrderedDict((k, v.detach().cpu().numpy()) for k, v in sd.items())


def import_reference_model(state_dict: Mapping[str, np.ndarray], arch_name: str,
                           num_classes: int, **arch_kw) -> tuple[Arch, dict]:
  """Reference state dict -> ``(arch, variables)`` at the widths read off the shapes.

  Args:
    state_dict: ordered mapping key -> array (reference key names; numpy or torch tensors).
    arch_name: the reference model name (``resnet56``, ``resnet110``, ``VGG19``, ``resnet50``;
      any case).
    num_classes: number of classes.
    **arch_kw: builder options passed to :func:`~metaprune_jax.nets.zoo.get_arch`.

  Returns:
    ``(arch, variables)``: the Arch at the state dict's widths and ``{'params',
    'batch_stats'}`` as float32 numpy arrays in flax layouts (conv kernels ``[k, k, C_in,
    C_out]`` from torch's ``[C_out, C_in, k, k]``, dense kernels ``[C_in, C_out]``, BatchNorm
    ``scale``/``bias``/``mean``/``var`` ``[C]``). ``num_batches_tracked`` entries are ignored.

  Raises:
    ValueError: unknown model, missing/extra keys, wrong ranks, or widths that do not fit
      (e.g. a residual stage with unequal widths); the message names the key.
  """
  full = zoo.get_arch(_zoo_name(arch_name), num_classes, **arch_kw)
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in state_dict.items()}
  expected = _expected_keys(full, with_nbt=False)
  exp_names = {k for k, _, _ in expected}
  missing = [k for k in exp_names if k not in sd]
  extra = [k for k in sd if k not in exp_names and not k.endswith(".num_batches_tracked")]
  if missing or extra:
    raise ValueError(f"state dict does not fit {arch_name}: missing keys {sorted(missing)[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected keys {sorted(extra)[:8]}")
  # widths from shapes
  widths: dict[str, tuple[int, str]] = {}

  def claim(space, n, key):
    if space in widths and widths[space][0] != n:
      raise ValueError(f"{key}: {n} channels, but {widths[space][1]} gives the coupled channel "
                       f"space {space!r} {widths[space][0]} channels (residual-coupled layers "
                       "must have equal widths)")
    widths.setdefault(space, (n, key))
  for l in full.layers:
    w = sd[f"{l.ref}.weight"]
    if l.kind == "conv":
      if w.ndim != 4 or w.shape[2:] != (l.kernel, l.kernel):
        raise ValueError(f"{l.ref}.weight: expected [out, in, {l.kernel}, {l.kernel}], "
                         f"got {w.shape}")
      claim(l.out_space, w.shape[0], f"{l.ref}.weight")
      claim(l.in_space, w.shape[1], f"{l.ref}.weight")
    elif l.kind == "dense":
      if w.ndim != 2:
        raise ValueError(f"{l.ref}.weight: expected [out, in], got {w.shape}")
      claim(l.out_space, w.shape[0], f"{l.ref}.weight")
      claim(l.in_space, w.shape[1], f"{l.ref}.weight")
    else:
      if w.ndim != 1:
        raise ValueError(f"{l.ref}.weight: expected a vector, got {w.shape}")
      claim(l.out_space, w.shape[0], f"{l.ref}.weight")
  if widths["classes"][0] != num_classes:
    raise ValueError(f"{widths['classes'][1]}: {widths['classes'][0]} outputs, but "
                     f"num_classes={num_classes}")
  if widths["input"][0] != 3:
    raise ValueError(f"{widths['input'][1]}: expected 3 input channels, got {widths['input'][0]}")
  arch = full.with_widths({s: n for s, (n, _) in widths.items()})
  pshapes, sshapes = arch.param_shapes(), arch.stat_shapes()
  variables = {"params": {}, "batch_stats": {}}
  for key, layer, leaf in _expected_keys(arch, with_nbt=False):
    a = sd[key].astype(np.float32)
    lk = arch.layer(layer)
    if leaf == "kernel":
      a = a.transpose(2, 3, 1, 0) if lk.kind == "conv" else a.T
    coll = "batch_stats" if leaf in ("mean", "var") else "params"
    shape = (sshapes if coll == "batch_stats" else pshapes)[layer][leaf]
    if a.shape != shape:
      raise ValueError(f"{key}: shape {sd[key].shape} does not fit widths {dict(arch.widths)}")
    variables[coll].setdefault(layer, {})[leaf] = np.ascontiguousarray(a)
  return arch, variables


def export_reference_state_dict(arch: Arch, variables: Mapping,
                                num_batches_tracked: bool = False
                                ) -> "collections.OrderedDict[str, np.ndarray]":
  """``(arch, variables)`` -> reference state dict (numpy, reference layouts and order).

  Also reads gradients: a pytree with the structure of ``variables['params']`` (and optionally
  ``batch_stats``) exports the keys it has. ``num_batches_tracked`` adds those int64 entries
  (value 1), which the reference's positional graph converters need.

  Args:
    arch: the architecture at the variables' widths.
    variables: ``{'params', 'batch_stats'}`` (``batch_stats`` may be missing or empty: its
      keys are then left out).
    num_batches_tracked: add each BatchNorm's ``<ref>.num_batches_tracked`` (``[]`` int64).

  Returns:
    An ``OrderedDict`` reference key -> contiguous float32 numpy array in torch layouts (conv
    ``weight [C_out, C_in, k, k]``, Linear ``weight [out, in]``, biases and BatchNorm
    ``weight``/``bias``/``running_mean``/``running_var`` ``[C]``), in the reference's order.

  Raises:
    ValueError: a params leaf (or, when ``batch_stats`` is not empty, a statistics leaf) that
      ``arch`` needs and ``variables`` lack.
  """
  params = variables.get("params", {})
  stats = variables.get("batch_stats", {})
  out = collections.OrderedDict()
  for key, layer, leaf in _expected_keys(arch, with_nbt=num_batches_tracked):
    if leaf is None:
      out[key] = np.array(1, np.int64)
      continue
    src = stats if leaf in ("mean", "var") else params
    if layer not in src or leaf not in src[layer]:
      if src is stats and not stats:
        continue
      raise ValueError(f"{arch.name}: variables lack {layer}/{leaf} for {key}")
    a = np.asarray(src[layer][leaf], np.float32)
    lk = arch.layer(layer)
    if leaf == "kernel":
      a = a.transpose(3, 2, 0, 1) if lk.kind == "conv" else a.T
    out[key] = np.ascontiguousarray(a)
  return out
