"""The :class:`~metaprune_jax.nets.arch.Arch` of a user's ``flax.linen`` CNN, derived by tracing it.

:func:`from_flax` traces the module's inference forward pass (``module.apply(variables, x)``,
BatchNorm on its running averages) to a jaxpr with ``jax.make_jaxpr`` and walks it once,
equation by equation, with an abstract interpreter whose values are either

* an **activation**: a tensor that depends on the input image, named like an ``Arch`` tensor
  and carrying its channel space (a union-find id: a residual addition joins the spaces of its
  operands, DepGraph-style), plus a list of *pending* per-channel affine steps (``x - m``,
  ``x * a``, ``x / d``, ``x + b``) not yet identified; or
* a **parameter value**: computed from variable leaves and constants only. It is evaluated
  concretely (so the pending affine steps can be checked numerically) and remembers the leaves
  it reads, the leaf it *is* (up to reshapes and broadcasts) and any ``leaf + constant``
  (the BatchNorm epsilon).

Equations map to ``Arch`` ops as follows: ``conv_general_dilated`` with a parameter leaf as
kernel -> ``conv``; ``dot_general`` of a ``[B, C]`` activation and a ``[C, O]`` leaf ->
``dense``; an added ``[O]`` leaf right after either -> its bias; a run of pending affine steps
that reads a variance (``leaf + eps``), a mean and optionally a scale and a bias of one module
-> ``bn`` (checked numerically against ``scale * (x - mean) / sqrt(var + eps) + bias``, any
algebraic arrangement); a chain of elementwise primitives of one activation and constants
(``max(x, 0)``, ``tanh``, ``erf``, ``logistic``, ``select_n``, constant arithmetic, inside calls
or inlined) -> ``relu`` or ``act`` once its values on a grid of probe points match a function of
:mod:`metaprune_jax.nets.activations` (gelu, silu, tanh, leaky_relu, elu, relu6, ...);
activation + activation -> ``add``; ``reduce_window_max`` -> ``maxpool``; a window sum divided by
its window area -> ``avgpool``, or ``gap`` when the window (or a ``reduce_sum``) covers the whole
image; reshapes that only drop unit spatial axes -> nothing; a flatten of a square ``[B, k, k,
C]`` map read by a dense layer ``[k*k*C, O]`` (hidden, or the classifier) -> a ``conv`` with a
``k x k`` kernel (no padding,
the same arithmetic in NHWC flatten order; the kernel is reshaped both ways) and a ``flatten``
of its ``1 x 1`` output. Calls (``jit``,
``custom_jvp_call``, ``custom_vjp_call``, remat) are walked inside. Anything else
raises :class:`TraceError` naming the primitive, the user's source line and the flax module
path (the jaxpr's name stack); nothing is guessed.

Naming: a layer is named after its flax module path (``layer1/conv1`` -> layer ``layer1_conv1``,
``ref`` ``layer1.conv1``); a channel space after the first layer that writes it (``input`` and
``classes`` as in the zoo). The returned variables use our layout (``params/<layer>/{kernel,
bias, scale}``, ``batch_stats/<layer>/{mean, var}``) and hold the user's arrays; the map back
to the user's leaves is stored in ``arch.origin``, which :func:`to_flax_variables` reads.

BatchNorm epsilon: ``cnn.BatchNorm`` normalises with ``1e-5`` (flax's and PyTorch's default).
A BatchNorm traced with another epsilon keeps its exact outputs by storing ``var + eps - 1e-5``
as our running variance; :func:`to_flax_variables` subtracts the shift again.

Padding: any zero padding per side, for convolutions and pools (flax's ``'SAME'`` with a stride
on an even input pads ``(0, 1)``): the Arch stores the PyTorch-style int when it is equal on
every side, else ``((top, bottom), (left, right))``.

The interpreter (values, primitive handlers) is :mod:`metaprune_jax.nets.trace_ops`; this module
is the public API.

Limits (each raises with the reason): square kernels and windows, equal strides; no dilation,
groups (depthwise), concatenation, transposes, attention or gating (products of two
activations), activations that map 0 elsewhere than 0 (sigmoid, softplus) or are not in the
registry, activations with learned parameters, average pooling that excludes the padding from
its count (``count_include_pad=False`` with padding), a flattened spatial map that is not square
or is read by anything but a dense layer, or float types other than float32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.backends import switch
from metaprune_jax.nets.arch import CLASSES, INPUT, Arch
from metaprune_jax.nets.trace_ops import OUR_EPS, TraceError, _Act, _Param, _Tracer, _p  # noqa: F401 (OUR_EPS re-exported)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _flat_leaves(variables) -> dict:
  """``{path: leaf}``; a path is a tuple of dict keys (str, or int for nnx lists)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    key = []
    for k in path:
      key.append(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    out[tuple(key)] = leaf
  return out


def from_flax(module: nn.Module, variables: Mapping, example_input, *, name: str | None = None,
              count_relu: bool = True, node_style: str | None = None,
              edge_style: str | None = None, init: str = "resnet", ref_name: str | None = None,
              ref_fn=None, **apply_kwargs) -> tuple[Arch, dict]:
  """Derives the :class:`Arch` of a flax.linen CNN by tracing its inference forward pass.

  Args:
    module: a ``flax.linen.Module`` mapping ``[B, H, W, C]`` images to ``[B, classes]`` logits.
    variables: its variables (``{'params', 'batch_stats', ...}``), e.g. from ``module.init``.
      Never modified.
    example_input: an ``[B, H, W, C]`` float32 array (or ``jax.ShapeDtypeStruct``): the input
      whose shapes are traced.
    name: the Arch's name (default: the module's class name, lower case).
    count_relu: whether each ReLU counts ``numel`` MACs (Torch-Pruning counts ``nn.ReLU``
      modules, not functional relus; there is no such distinction in flax).
    node_style, edge_style: the graph family (default: chosen from the layers found, see
      :func:`graph_styles`).
    init: the Arch's init style for fresh variables (``"resnet"`` or ``"vgg"``).
    ref_name: the Arch's ``ref_name`` (default: ``name``).
    ref_fn: ``module path (tuple of str) -> ref`` (the layer's name in a PyTorch twin, used by
      the reference import/export); default: the path joined with dots.
    **apply_kwargs: passed to ``module.apply`` (e.g. ``train=False``).

  Returns:
    ``(arch, ours)``: the description (validated) and ``{'params', 'batch_stats'}`` in our
    layout holding the user's arrays (a BatchNorm with ``epsilon != 1e-5`` stores a shifted
    running variance; a BatchNorm without scale/bias gets ones/zeros).

  Raises:
    TraceError: an operation the Arch cannot express (names it, its source line and module
      path), a forward pass that needs a mutable collection or an RNG, an input of the wrong
      rank, variables that do not match the module.
  """
  shape = _check_input(example_input)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TraceError("variables must be a mapping with a 'params' collection (as returned by "
                     "module.init)")
  leaves = _flat_leaves(variables)
  def fwd(v, x):
    return module.apply(v, x, **apply_kwargs)
  return _trace(fwd, variables, leaves, shape, name or type(module).__name__.lower(),
                count_relu, node_style, edge_style, init, ref_name, ref_fn)


def from_nnx(model, example_input, *, name: str | None = None, count_relu: bool = True,
             node_style: str | None = None, edge_style: str | None = None, init: str = "resnet",
             ref_name: str | None = None, ref_fn=None, **call_kwargs) -> tuple[Arch, dict]:
  """:func:`from_flax` for a ``flax.nnx`` module: traces ``model(x, **call_kwargs)``.

  The model must be in inference mode (``model.eval()``: BatchNorm on running averages, dropout
  off). Its ``nnx.Param`` and ``nnx.BatchStat`` variables are read as the pure dicts
  :func:`nnx_variables` returns (``{'params': ..., 'batch_stats': ...}``, keyed by attribute
  path): pass that as ``like`` to :func:`to_flax_variables`, and put the result back with
  ``nnx.replace_by_pure_dict`` + ``nnx.update`` (or :func:`update_nnx`). Layers are named after
  attribute paths (``blocks/0/conv`` -> ``blocks_0_conv``). The model is not modified.

  Args:
    model: a ``flax.nnx.Module`` in eval mode mapping ``[B, H, W, C]`` images to ``[B,
      classes]`` logits.
    example_input: an ``[B, H, W, C]`` float32 array (or ``jax.ShapeDtypeStruct``).
    name, count_relu, node_style, edge_style, init, ref_name, ref_fn: as :func:`from_flax`
      (``name`` defaults to the model's class name, lower case).
    **call_kwargs: passed to ``model(x, ...)``.

  Returns:
    ``(arch, ours)`` as :func:`from_flax`: the validated Arch and ``{'params',
    'batch_stats'}`` in our layout holding the model's arrays.

  Raises:
    TraceError: as :func:`from_flax`; a BatchNorm not on running averages, an active dropout.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  shape = _check_input(example_input)
  for path, m in nnx.iter_graph(model):
    if isinstance(m, nnx.BatchNorm) and not m.use_running_average:
      raise TraceError(f"BatchNorm {_p(path)} normalises with batch statistics and updates its "
                       "running averages (a mutable collection); call model.eval() first")
    if isinstance(m, nnx.Dropout) and not m.deterministic and m.rate > 0:
      raise TraceError(f"Dropout {_p(path)} is active and needs an RNG; call model.eval() first")
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  variables = nnx_variables(model)
  leaves = _flat_leaves(variables)

  def fwd(v, x):
    p = jax.tree_util.tree_map(lambda a: a, params)
    st = jax.tree_util.tree_map(lambda a: a, stats)
    nnx.replace_by_pure_dict(p, v["params"])
    nnx.replace_by_pure_dict(st, v["batch_stats"])
    return nnx.merge(graphdef, p, st, rest)(x, **call_kwargs)
  return _trace(fwd, variables, leaves, shape, name or type(model).__name__.lower(),
                count_relu, node_style, edge_style, init, ref_name, ref_fn)


def nnx_variables(model) -> dict:
  """``{'params': pure dict of nnx.Param, 'batch_stats': pure dict of nnx.BatchStat}``.

  Args:
    model: a ``flax.nnx.Module`` (not modified).

  Returns:
    Nested dicts keyed by attribute path holding the model's arrays,
    e.g. ``{'params': {'conv': {'kernel': [k, k, C_in, C_out], ...}}, 'batch_stats': {'bn':
    {'mean': [C], 'var': [C]}}}``: the ``like`` tree of :func:`to_flax_variables`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(stats)}


def update_nnx(model, tree: Mapping) -> None:
  """Writes ``tree`` (:func:`to_flax_variables` of an nnx trace) into ``model``'s variables.

  Args:
    model: the ``flax.nnx.Module`` traced by :func:`from_nnx`; updated in place (arrays of
      other shapes, e.g. pruned widths, replace the old ones).
    tree: ``{'params': ..., 'batch_stats': ...}`` pure dicts with :func:`nnx_variables`'s
      keys.

  Raises:
    KeyError: ``tree`` without ``'params'`` or ``'batch_stats'``.
    ValueError: (flax's ``nnx.replace_by_pure_dict``) a key the model does not have.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  nnx.replace_by_pure_dict(params, tree["params"])
  nnx.replace_by_pure_dict(stats, tree["batch_stats"])
  nnx.update(model, params, stats)


def _check_input(example_input) -> tuple:
  shape = tuple(getattr(example_input, "shape", None) or np.shape(example_input))
  if len(shape) != 4:
    raise TraceError(f"example_input must be an NHWC image batch [B, H, W, C]; got shape "
                     f"{shape}")
  dtype = getattr(example_input, "dtype", np.float32)
  if dtype != jnp.float32:
    raise TraceError(f"example_input must be float32, got {dtype}")
  return shape


def _trace(fwd, variables, leaves, shape, name, count_relu, node_style, edge_style, init,
           ref_name, ref_fn):
  """Traces ``fwd(variables, x)`` and derives the Arch (from_flax / from_nnx)."""
  for path, leaf in leaves.items():
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise TraceError(f"variable {_p(path)} is not an array ({type(leaf).__name__})")
  x_spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  v_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  try:
    # plain JAX ops (the XLA:CPU settings would put C++ kernel calls into the jaxpr); the
    # network's forward has no inner jit, so nothing traced here is cached: keep the caches
    with switch.backend_tuning("none", clear_caches=False):
      closed = jax.make_jaxpr(fwd)(v_spec, x_spec)
  except flax.errors.FlaxError as e:
    msg = str(e).split("\n")[0]
    if isinstance(e, (flax.errors.ModifyScopeVariableError,)):
      raise TraceError(f"the module's inference forward pass writes a variable collection "
                       f"({msg}). Trace it in inference mode: BatchNorm with "
                       "use_running_average=True (pass e.g. train=False)") from None
    if isinstance(e, (flax.errors.InvalidRngError,)) or "rng" in msg.lower():
      raise TraceError(f"the module's inference forward pass needs an RNG ({msg}); make "
                       "dropout and other random layers deterministic (e.g. train=False)") \
          from None
    raise TraceError(f"the variables do not match the module: {msg}") from None
  except (TypeError, ValueError) as e:
    raise TraceError(f"tracing module.apply(variables, example_input) failed: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  out_shapes = closed.out_avals
  if len(out_shapes) != 1 or len(out_shapes[0].shape) != 2:
    raise TraceError(f"the module must return one [B, classes] array; it returns "
                     f"{[tuple(a.shape) for a in out_shapes]}")
  flat_paths = list(_flat_leaves(variables).keys())
  leaf_values = {p: np.asarray(a) for p, a in leaves.items()}
  tr = _Tracer(flat_paths, leaf_values, count_relu, ref_fn)
  input_space = tr.new_space(shape[3], INPUT)
  args = [_Param(leaf_values[p], frozenset([p]), p) for p in flat_paths]
  args.append(_Act("x", input_space, shape))
  (out,) = tr.run(closed.jaxpr, [_Param(np.asarray(c)) for c in closed.consts], args)
  if not isinstance(out, _Act) or out.pend or out.pool:
    raise TraceError("the module's output is not a dense layer's output (does it end in a "
                     "classifier? trailing per-channel transforms, softmax etc. are not "
                     "supported)")
  flat_head = (len(tr.ops) >= 2 and tr.ops[-1].op == "flatten" and tr.ops[-2].op == "conv"
               and tr.ops[-1].output == out.tensor)  # a classifier reading a flattened map
  if not tr.ops or tr.ops[-1].output != out.tensor or (tr.ops[-1].op != "dense"
                                                       and not flat_head):
    raise TraceError("the module's output must be the output of its last dense layer (the "
                     "classifier)")
  unread = sorted(_p(p) for p in flat_paths if p not in tr.read
                  and p[0] in ("params", "batch_stats"))
  if unread:
    raise TraceError(f"variables never read by the forward pass (or read in a way the Arch does "
                     f"not describe): {unread}")
  arch, ours = _assemble(tr, out, shape, variables, leaves, name, ref_name or name, init,
                         node_style, edge_style)
  return arch, ours


def _assemble(tr, out, shape, variables, leaves, name, ref_name, init, node_style, edge_style):
  roots = {}
  cls_root = tr.find(out.space)
  in_root = tr.find(0)
  if cls_root == in_root:
    raise TraceError("the classifier's output space is joined with the input's")
  widths = {}
  for sid in range(len(tr.parent)):
    r = tr.find(sid)
    if r in roots:
      continue
    if r == in_root:
      nm = INPUT
    elif r == cls_root:
      nm = CLASSES
    else:
      nm = tr.space_writer[r]
    roots[r] = nm
  # spaces in order of first use by a layer, input first and classes last
  order = [INPUT]
  for l in tr.layers:
    for s in tr.layer_space[l.name]:
      if s is not None and roots[tr.find(s)] not in order and roots[tr.find(s)] != CLASSES:
        order.append(roots[tr.find(s)])
  order.append(CLASSES)
  for sid in range(len(tr.parent)):
    widths[roots[tr.find(sid)]] = tr.space_width[sid]
  layers = []
  rank = {o.layer: i for i, o in enumerate(tr.ops) if o.layer}
  for l in sorted(tr.layers, key=lambda l: rank[l.name]):
    i, o = tr.layer_space[l.name]
    layers.append(dataclasses.replace(
        l, in_space=None if i is None else roots[tr.find(i)], out_space=roots[tr.find(o)]))
  num_classes = widths[CLASSES]
  # tensors renamed t1, t2, ... in op order (as the zoo's Builder names them)
  rename = {"x": "x"}
  ops = []
  for i, o in enumerate(tr.ops):
    rename[o.output] = f"t{i + 1}"
    ops.append(dataclasses.replace(o, inputs=tuple(rename[t] for t in o.inputs),
                                   output=rename[o.output]))
  ops = tuple(ops)
  ours = {"params": {}, "batch_stats": {}}
  origin = []
  for (coll, layer, leaf), (path, shift) in sorted(tr.origin.items(), key=lambda kv: (
      [l.name for l in layers].index(kv[0][1]), kv[0][0], kv[0][2])):
    if path is None:
      c = widths[[l for l in layers if l.name == layer][0].out_space]
      a = jnp.full((c,), shift, jnp.float32)
      origin.append((coll, layer, leaf, (), shift))
    else:
      a = leaves[path]
      lay = next(l for l in layers if l.name == layer)
      if lay.kind == "conv" and leaf == "kernel" and np.ndim(a) == 2:  # a flattened dense
        a = jnp.reshape(a, (lay.kernel, lay.kernel, -1, np.shape(a)[-1]))
      if shift:
        a = a + jnp.asarray(shift, a.dtype)
      origin.append((coll, layer, leaf, tuple(path), float(shift)))
    ours[coll].setdefault(layer, {})[leaf] = a
  ns, es = graph_styles(layers)
  arch = Arch(name=name, ref_name=ref_name, num_classes=num_classes, layers=tuple(layers), ops=ops,
              widths=tuple((s, widths[s]) for s in order), node_style=node_style or ns,
              edge_style=edge_style or es, init=init, origin=tuple(origin))
  try:
    arch.validate()
  except ValueError as e:
    raise TraceError(f"the traced description is inconsistent: {e}") from None
  return arch, ours


def graph_styles(layers) -> tuple[str, str]:
  """The graph family that fits ``layers``: ``(node_style, edge_style)``.

  ``vgg`` node features (bn + conv bias) unless a projection shortcut has a BatchNorm (then
  ``resnet``: bn + downsample bn; ``full``, 9 columns, when conv biases come too); ``single``
  edges (3x3 slots) when every kernel is 1x1 or 3x3, else ``multi`` (one edge kind per kernel
  area, any size).
  """
  ds_bn = any(l.shortcut and l.kind == "bn" for l in layers)
  conv_bias = any(l.bias and l.kind == "conv" for l in layers)
  ks = {l.kernel for l in layers if l.kind == "conv"}
  node = ("full" if conv_bias else "resnet") if ds_bn else "vgg"
  return node, ("single" if ks <= {1, 3} else "multi")


def to_flax_variables(arch: Arch, variables: Mapping, like: Mapping) -> dict:
  """Puts our (possibly pruned) variables back into the user's tree, with the user's names.

  Args:
    arch: a traced Arch (from :func:`from_flax`, possibly materialised at smaller widths).
    variables: ``{'params', 'batch_stats'}`` in our layout for ``arch``.
    like: the user's variables (the tree passed to :func:`from_flax`); leaves the Arch does not
      describe (other collections) are copied as they are.

  Returns:
    A new tree with ``like``'s structure and names holding ``variables``' arrays (BatchNorm
    variances shifted back where the user's epsilon is not 1e-5). ``like`` is not modified.

  Raises:
    ValueError: ``arch`` not traced (empty ``arch.origin``), a leaf ``variables`` lack, or a
      path ``like`` does not have.
  """
  if not arch.origin:
    raise ValueError(f"{arch.name}: not a traced architecture (arch.origin is empty)")

  def copy(t):
    if isinstance(t, Mapping):
      return {k: copy(v) for k, v in t.items()}
    return t
  out = copy(like)
  for coll, layer, leaf, path, shift in arch.origin:
    if not path:
      continue
    try:
      a = variables[coll][layer][leaf]
    except (KeyError, TypeError):
      raise ValueError(f"{arch.name}: variables lack {coll}/{layer}/{leaf}") from None
    if shift:
      a = a - jnp.asarray(shift, a.dtype)
    node = out
    for k in path[:-1]:
      if k not in node:
        raise ValueError(f"{arch.name}: 'like' has no {_p(path)}")
      node = node[k]
    if np.ndim(a) == 4 and np.ndim(node.get(path[-1])) == 2:  # a conv kernel of a flattened
      a = jnp.reshape(a, (-1, np.shape(a)[-1]))               # dense layer: [k*k*C, O]
    node[path[-1]] = a
  return out


@functools.lru_cache(maxsize=32)
def arch_from_factory(spec: str, num_classes: int) -> Arch:
  """The traced Arch of ``"package.module:factory"`` (what ``--config.arch=`` accepts).

  ``factory(num_classes)`` returns a flax module, ``(module, example_input)`` or ``(module,
  example_input, apply_kwargs)``; the example input defaults to ``[1, 32, 32, 3]`` zeros. The
  module is initialised with ``module.init(PRNGKey(0), example_input, **apply_kwargs)`` and
  traced with :func:`from_flax` (its name: the factory's).

  Raises:
    ValueError: a malformed spec, a module or factory that cannot be imported.
    TraceError: as :func:`from_flax`.
  """
  mod_name, _, fn_name = spec.partition(":")
  if not mod_name or not fn_name:
    raise ValueError(f"architecture {spec!r}: expected 'package.module:factory'")
  try:
    factory = getattr(importlib.import_module(mod_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"architecture {spec!r}: cannot import the factory ({e})") from None
  made = factory(num_classes)
  made = made if isinstance(made, tuple) else (made,)
  module = made[0]
  x = made[1] if len(made) > 1 else jnp.zeros((1, 32, 32, 3), jnp.float32)
  kwargs = dict(made[2]) if len(made) > 2 else {}
  variables = jax.jit(lambda k, x: module.init(k, x, **kwargs))(jax.random.key(0), x)
  arch, _ = from_flax(module, variables, x, name=fn_name, **kwargs)
  if arch.num_classes != num_classes:
    raise TraceError(f"architecture {spec!r}: the module has {arch.num_classes} outputs, the "
                     f"dataset {num_classes} classes")
  return arch


__all__ = ["TraceError", "from_flax", "from_nnx", "to_flax_variables", "nnx_variables",
           "update_nnx", "graph_styles", "arch_from_factory"]
