"""The abstract interpreter behind :mod:`metaprune_jax.nets.trace`: a jaxpr walked into Arch ops.

Over 400 lines on purpose: one class, :class:`_Tracer`, whose primitive handlers all read and
write the same walk state (the union-find of channel spaces, the pending BatchNorm steps, the
emitted ops and the variable mapping); cutting it across modules would split one walk in two.
The public API (``from_flax``, ``from_nnx``, ``to_flax_variables``, ...) lives in
:mod:`metaprune_jax.nets.trace`; how values and equations map to the Arch is described there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from metaprune_jax.nets import cnn
from metaprune_jax.nets import activations
from metaprune_jax.nets.arch import Layer, Op, compact_padding

try:  # jax >= 0.4.30
  from jax.extend.core import Literal as _Literal
except ImportError:  # pragma: no cover
  from jax.core import Literal as _Literal  # type: ignore

OUR_EPS = cnn.BN_EPS


class TraceError(ValueError):
  """An operation (or input) :func:`from_flax` cannot place in an :class:`Arch`."""


# ---------------------------------------------------------------------------------------------
# Values of the abstract interpreter
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Param:
  """A value computed from variable leaves and constants only.

  Attributes:
    val: its concrete value (numpy).
    leaves: the variable leaves it reads (paths, tuples of str).
    pure: the leaf it is (up to reshape/broadcast/dtype), else None.
    eps: ``((leaf, constant), ...)`` for every ``leaf + constant`` on its way.
  """

  val: Any
  leaves: frozenset = frozenset()
  pure: tuple | None = None
  eps: tuple = ()


# Primitives that may read a flattened spatial map (``_Act.spatial``): the dense layer, and
# steps that leave it as it is.
_READS_FLATTENED = ("dot_general", "reshape", "convert_element_type", "copy", "copy_p",
                    "stop_gradient")


@dataclasses.dataclass(frozen=True)
class _Act:
  """An activation: Arch tensor ``tensor`` [B, H, W, C] or [B, C] in channel space ``space``.

  ``pend``: pending per-channel affine steps ``((op, _Param, where), ...)`` applied to
  ``tensor``; ``fresh``: the conv/dense layer that produced ``tensor`` if nothing followed it
  (its bias may still come); ``pool``: the window area while a window sum awaits its division
  (``H*W`` for a whole-image sum); ``pooling``: ``(window, stride, padding)`` of that window
  sum when it is not over the whole image (an average pooling); ``shape``: the shape of the
  jaxpr value.
  """

  tensor: str
  space: int
  shape: tuple
  pend: tuple = ()
  fresh: str | None = None
  pool: int = 0
  flat: bool = False  # a [B, C] tensor of the Arch (after gap/dense), whatever its shape here
  pooling: tuple | None = None
  spatial: tuple | None = None  # (H, W, C) of a [B, H, W, C] map flattened to [B, H*W*C]


@dataclasses.dataclass(frozen=True, eq=False)
class _Elem:
  """An elementwise function of one activation ``base`` (a flushed :class:`_Act`), not yet named.

  ``fn`` maps the base's value to this value by re-binding the traced primitives (so it can be
  evaluated on probe points); ``prims``/``calls``: the primitives and named calls (``silu``,
  ``gelu``, ...) it went through, for messages; ``where``: its first equation; ``anchor``: the
  output of the last Arch op when it started (the activation op goes right after it, where the
  program computed it).
  """

  base: _Act
  fn: Any
  shape: tuple
  prims: tuple
  calls: tuple
  where: str
  anchor: str | None


_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr", "remat2": "jaxpr"}
# primitives an activation's program may use (all elementwise, one output)
_ELEMENTWISE = frozenset((
    "logistic", "tanh", "exp", "exp2", "log", "log1p", "erf", "erfc", "erf_inv", "sqrt",
    "rsqrt", "integer_pow", "pow", "abs", "sign", "select_n", "min", "max", "clamp", "sin",
    "cos", "expm1", "square", "cbrt", "tan", "neg", "add", "add_any", "sub", "mul", "div", "ge",
    "gt", "le", "lt", "eq", "ne", "not", "and", "or", "convert_element_type", "copy", "copy_p"))
_AFFINE = {"add": "add", "add_any": "add", "sub": "sub", "mul": "mul", "div": "div"}
_THIS_DIR_FILES = (os.path.abspath(__file__),
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "trace.py"))


def _where(eqn, prefix: str) -> str:
  """``"<file>:<line>, module <path>"`` of a jaxpr equation (the user's frame)."""
  line = "unknown line"
  skip = (os.path.dirname(flax.__file__), os.path.dirname(jax.__file__), *_THIS_DIR_FILES)
  traceback = eqn.source_info.traceback  # jaxlib's Traceback (public: .frames), or None
  for f in (traceback.frames if traceback is not None else ()):
    name = os.path.abspath(f.file_name)
    # the first frame outside jax, flax and this module, skipping the tracer's own python frames
    if not name.startswith(skip) and "site-packages" not in name and not name.startswith("<"):
      line = f"{f.file_name}:{f.line_num}"
      break
  stack = "/".join(s for s in (prefix, str(eqn.source_info.name_stack)) if s)
  path = "/".join(stack.split("/")[1:]) or "(top level)"
  return f"{line}, module {path}"


class _Tracer:
  """Walks one jaxpr and accumulates layers, ops, spaces and the variable mapping."""

  def __init__(self, leaf_paths, leaf_values, count_relu: bool, ref_fn=None):
    self.ref_fn = ref_fn or ".".join
    self.leaf_paths = leaf_paths
    self.leaf_values = leaf_values  # path -> np.ndarray
    self.count_relu = count_relu
    self.layers: list[Layer] = []
    self.ops: list[Op] = []
    self.parent: list[int] = []  # union-find over spaces
    self.space_width: list[int] = []
    self.space_writer: list[str | None] = []
    self.layer_space: dict[str, tuple] = {}  # layer -> (in_space id | None, out_space id)
    self.origin: dict[tuple, tuple] = {}  # (coll, layer, leaf) -> (user path, shift)
    self.read: set = set()
    self.flatten_at: dict[str, str] = {}  # tensor of a `flatten` op -> where the model flattens
    self.n = 0
    self.flushed: dict[int, _Act] = {}
    self.closed: dict[int, tuple] = {}  # id(_Elem) -> (_Elem, _Act)
    self.calls: list[str] = []  # names of the calls being walked (for messages)
    self.producer: dict[str, Op] = {}
    self.conv_depth: dict[str, int] = {"x": 0}
    self.modules: dict[str, tuple] = {}

  # --------------------------------------------------------------------------- bookkeeping
  def new_space(self, width: int, writer: str | None) -> int:
    self.parent.append(len(self.parent))
    self.space_width.append(int(width))
    self.space_writer.append(writer)
    return len(self.parent) - 1

  def find(self, s: int) -> int:
    while self.parent[s] != s:
      self.parent[s] = self.parent[self.parent[s]]
      s = self.parent[s]
    return s

  def union(self, a: int, b: int) -> int:
    a, b = self.find(a), self.find(b)
    if a != b:
      self.parent[max(a, b)] = min(a, b)
    return min(a, b)

  def tmp(self) -> str:
    self.n += 1
    return f"t{self.n}"

  def emit(self, op: Op) -> None:
    self.ops.append(op)
    self.producer[op.output] = op
    d = max(self.conv_depth.get(t, 0) for t in op.inputs)
    self.conv_depth[op.output] = d + (1 if op.op in ("conv", "dense") else 0)

  def layer_name(self, path: tuple, where: str) -> tuple[str, str]:
    module = tuple(str(k) for k in path[1:-1])
    if not module:
      raise TraceError(f"a variable at the top level ({_p(path)}) used as a layer "
                       f"parameter at {where}: layers must be submodules")
    name = "_".join(module)
    other = self.modules.setdefault(name, module)
    if other != module:
      raise TraceError(f"modules {_p(other)} and {_p(module)} both give the layer "
                       f"name {name!r} (at {where}); rename one of them")
    if any(l.name == name for l in self.layers):
      raise TraceError(f"module {_p(module)} is used as a layer twice (weight sharing "
                       f"or a repeated call) at {where}; the Arch has one use per layer")
    return name, self.ref_fn(module)

  def take(self, path, coll, layer, leaf, shift=0.0):
    self.read.add(path)
    self.origin[(coll, layer, leaf)] = (path, float(shift))

  # --------------------------------------------------------------------------- main walk
  def run(self, jaxpr, consts, args, prefix=""):
    env = {}

    def read(v):
      if isinstance(v, _Literal):
        return _Param(np.asarray(v.val))
      return env[v]
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c if isinstance(c, (_Param, _Act, _Elem)) else _Param(np.asarray(c))
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins, prefix)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins, prefix):
    name = eqn.primitive.name
    if not any(isinstance(a, (_Act, _Elem)) for a in ins):
      return self.param_eqn(eqn, ins)
    where = _where(eqn, prefix)
    flat_map = next((a for a in ins if isinstance(a, _Act) and a.spatial), None)
    if flat_map is not None and name not in _CALLS and name not in _READS_FLATTENED:
      h, w, c = flat_map.spatial
      raise TraceError(f"a {name} on a {h}x{w}x{c} feature map flattened into "
                       f"{h * w * c} features at {where}: only a dense layer may read a "
                       "flattened map (pool to 1x1 first, or apply it before the flatten)")
    if name in _CALLS:
      key = _CALLS[name]
      inner = eqn.params[key]
      if callable(inner) and not hasattr(inner, "jaxpr"):
        inner = inner()
      sub_prefix = "/".join(s for s in (prefix, str(eqn.source_info.name_stack)) if s)
      self.calls.append(str(eqn.params.get("name", "")))
      try:
        if hasattr(inner, "consts"):
          return self.run(inner.jaxpr, [_Param(np.asarray(c)) for c in inner.consts], ins,
                          sub_prefix)
        return self.run(inner, [], ins, sub_prefix)
      finally:
        self.calls.pop()
    if name in _ELEMENTWISE and any(isinstance(a, _Elem) for a in ins):
      return [self.elementwise(eqn, ins, where)]
    return self.dispatch(eqn, ins, where)

  def dispatch(self, eqn, ins, where):
    """The handler ``p_<primitive>`` on ``ins`` (elementwise programs closed into ops first)."""
    name = eqn.primitive.name
    ins = [self.close(a) if isinstance(a, _Elem) else a for a in ins]
    handler = getattr(self, "p_" + name, None)
    if handler is None and name in _ELEMENTWISE:
      handler = self.elementwise
    if handler is None:
      what = _describe(name)
      raise TraceError(f"unsupported operation {name!r}{what} at {where}")
    out = handler(eqn, ins, where)
    return out if isinstance(out, list) else [out]

  # --------------------------------------------------------------------------- parameters
  def param_eqn(self, eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older jax: (subfuns, params)
      sub, params = params
    else:
      sub = ()
    vals = [jnp.asarray(p.val) for p in ins]
    out = eqn.primitive.bind(*sub, *vals, **params)
    outs = out if eqn.primitive.multiple_results else [out]
    leaves = frozenset().union(*[p.leaves for p in ins]) if ins else frozenset()
    eps = tuple(itertools.chain.from_iterable(p.eps for p in ins))
    name = eqn.primitive.name
    pure = None
    if name in ("reshape", "broadcast_in_dim", "convert_element_type", "squeeze",
                "expand_dims", "copy", "copy_p") and len(ins) == 1:
      pure = ins[0].pure
    if name == "add" and len(ins) == 2:
      for a, b in ((ins[0], ins[1]), (ins[1], ins[0])):
        if a.pure is not None and not b.leaves and np.size(b.val) == 1:
          eps = eps + ((a.pure, float(np.ravel(b.val)[0])),)
    return [_Param(np.asarray(o), leaves, pure, eps) for o in outs]

  def leaf_of(self, p, what, where, ndim=None) -> tuple:
    if not isinstance(p, _Param) or p.pure is None:
      leaves = sorted(_p(l) for l in getattr(p, "leaves", ()))
      raise TraceError(f"the {what} at {where} is not a variable leaf but a value computed from "
                       f"{leaves or 'constants'}; the Arch needs the parameter itself")
    if ndim is not None and np.ndim(p.val) != ndim:
      raise TraceError(f"the {what} at {where} has shape {np.shape(p.val)}")
    if self.leaf_values[p.pure].shape != np.shape(p.val):
      raise TraceError(f"the {what} at {where} reshapes variable {_p(p.pure)} "
                       f"{self.leaf_values[p.pure].shape} -> {np.shape(p.val)}")
    return p.pure

  # --------------------------------------------------------------------------- flush (BN)
  def flush(self, a: _Act, where: str) -> _Act:
    """``a`` with its pending affine steps turned into one BatchNorm op."""
    if not a.pend:
      if a.pool:
        raise TraceError(f"a window sum (average pooling without its division) is used "
                         f"at {where}")
      return a
    key = id(a)
    if key in self.flushed:
      return self.flushed[key][1]
    c = a.shape[-1]
    coef, off = np.ones(c), np.zeros(c)
    leaves, eps, role_hint = set(), {}, {}
    for op, p, _ in a.pend:
      v = np.broadcast_to(np.asarray(p.val, np.float64).reshape(-1), (c,))  # per channel
      leaves |= set(p.leaves)
      eps.update(dict(p.eps))
      if op == "add":
        off = off + v
        if p.pure is not None:
          role_hint.setdefault(p.pure, "bias_or_mean_neg")
      elif op == "sub":
        off = off - v
        if p.pure is not None:
          role_hint[p.pure] = "mean"
      elif op == "mul":
        coef, off = coef * v, off * v
      elif op == "div":
        coef, off = coef / v, off / v
    where0 = a.pend[0][2]
    leaves = sorted(leaves, key=_p)
    desc = ", ".join(_p(l) for l in leaves) or "constants only"
    var = [l for l in leaves if l in eps]
    if len(var) != 1 or len(leaves) < 2 or len(leaves) > 4:
      raise TraceError(
          f"a per-channel affine transform reading {desc} at {where0} is not a BatchNorm "
          f"(expected a running mean, a running variance plus epsilon, optionally a scale and "
          f"a bias); the Arch has no other per-channel scaling")
    var = var[0]
    e = eps[var]
    others = [l for l in leaves if l != var]
    vals = {l: np.asarray(self.leaf_values[l], np.float64).reshape(-1) for l in leaves}
    for l in leaves:
      if vals[l].shape != (c,):
        raise TraceError(f"BatchNorm at {where0}: variable {_p(l)} has shape "
                         f"{self.leaf_values[l].shape}, expected ({c},)")

    if np.any(vals[var] + e <= 0):
      raise TraceError(f"the BatchNorm reading {desc} at {where0}: variance {_p(var)} + "
                       f"epsilon {e:g} is not positive everywhere")

    def fits(assign):
      m = vals[assign["mean"]]
      s = vals[assign["scale"]] if assign.get("scale") else 1.0
      b = vals[assign["bias"]] if assign.get("bias") else 0.0
      a_ref = s / np.sqrt(vals[var] + e)
      b_ref = b - m * a_ref
      tol = 1e-5 * (1 + np.abs(a_ref))
      return (np.all(np.abs(coef - a_ref) <= tol) and
              np.all(np.abs(off - b_ref) <= 1e-5 * (1 + np.abs(b_ref) + np.abs(m * a_ref))))
    candidates = []
    roles_all = ("mean", "scale", "bias")
    for roles in itertools.permutations(roles_all, len(others)):
      assign = dict(zip(roles, others))
      if "mean" not in assign:
        continue
      ok_hint = all(role_hint.get(l) != "mean" or r == "mean" for r, l in assign.items())
      ok_hint = ok_hint and all(not (role_hint.get(l) == "bias_or_mean_neg" and r == "scale")
                                for r, l in assign.items())
      if ok_hint and fits(assign):
        candidates.append(assign)
    if len(candidates) > 1:  # same numbers (e.g. fresh init): use the names
      named = [c_ for c_ in candidates
               if all(r in str(l[-1]).lower() or
                      (r == "scale" and l[-1] in ("weight", "gamma")) or
                      (r == "bias" and l[-1] == "beta")
                      for r, l in c_.items())]
      if len(named) != 1:
        opts = "; ".join(", ".join(f"{r}={_p(l)}" for r, l in sorted(c_.items()))
                         for c_ in candidates)
        raise TraceError(
            f"the BatchNorm reading {desc} at {where0}: its variables' values do not tell which "
            f"is which (equally consistent: {opts}), nor do their names. Trace it with trained "
            "or random values, or name them scale/bias/mean/var")
      candidates = named
    if not candidates:
      raise TraceError(
          f"a per-channel affine transform reading {desc} at {where0} does not compute "
          f"scale * (x - mean) / sqrt(var + {e:g}) + bias for any assignment of those "
          f"variables; it is not a BatchNorm")
    assign = candidates[0]
    modules = {l[1:-1] for l in leaves}
    if len(modules) != 1:
      raise TraceError(f"the BatchNorm at {where0} reads variables of several modules: {desc}")
    name, ref = self.layer_name(leaves[0], where0)
    self.layers.append(Layer(name, ref, "bn", None, "?"))
    self.layer_space[name] = (None, a.space)
    self.take(assign["mean"], "batch_stats", name, "mean")
    shift = 0.0 if np.float32(e) == np.float32(OUR_EPS) else e - OUR_EPS
    self.take(var, "batch_stats", name, "var", shift)
    for r in ("scale", "bias"):
      if r in assign:
        self.take(assign[r], "params", name, r)
      else:
        self.origin[("params", name, r)] = (None, 1.0 if r == "scale" else 0.0)
    y = self.tmp()
    self.emit(Op("bn", (a.tensor,), y, layer=name))
    # where the program computed it: right after the op producing its input
    op = self.ops.pop()
    at = next((i + 1 for i, o in enumerate(self.ops) if o.output == a.tensor), 0)
    self.ops.insert(at, op)
    out = _Act(y, a.space, a.shape, flat=a.flat)
    self.flushed[key] = (a, out)
    return out

  # --------------------------------------------------------------------------- primitives
  def p_conv_general_dilated(self, eqn, ins, where):
    x, w = ins
    if not isinstance(x, _Act) or isinstance(w, _Act):
      raise TraceError(f"a convolution whose kernel depends on the input (dynamic weights) at "
                       f"{where}")
    x = self.flush(x, where)
    p = eqn.params
    if len(x.shape) != 4 or x.pool or x.flat:
      raise TraceError(f"a convolution over a pooled tensor of shape {x.shape} at {where}; the "
                       "Arch's convolutions read [B, H, W, C] feature maps")
    dn = jax.lax.conv_dimension_numbers(x.shape, np.shape(w.val), ("NHWC", "HWIO", "NHWC"))
    if tuple(p["dimension_numbers"]) != tuple(dn):
      raise TraceError(f"a convolution with dimension numbers {p['dimension_numbers']} at "
                       f"{where}; the Arch's convolutions are NHWC x HWIO (flax's layout)")
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      kind = "depthwise" if p["feature_group_count"] == x.shape[-1] else "grouped"
      raise TraceError(f"a {kind} convolution (feature_group_count="
                       f"{p['feature_group_count']}) at {where}; the Arch's convolutions are "
                       "dense over channels")
    if any(d != 1 for d in tuple(p["lhs_dilation"] or ()) + tuple(p["rhs_dilation"] or ())):
      raise TraceError(f"a dilated convolution (lhs_dilation={p['lhs_dilation']}, "
                       f"rhs_dilation={p['rhs_dilation']}) at {where}; the Arch has none")
    path = self.leaf_of(w, "convolution kernel", where, 4)
    kh, kw, cin, cout = np.shape(w.val)
    (sh, sw), pad = tuple(p["window_strides"]), tuple(tuple(q) for q in p["padding"])
    if kh != kw:
      raise TraceError(f"a {kh}x{kw} convolution at {where}; the Arch's kernels are square")
    if sh != sw:
      raise TraceError(f"a convolution with strides ({sh}, {sw}) at {where}; the Arch's "
                       "strides are equal on both axes")
    if len(pad) != 2 or min(v for q in pad for v in q) < 0:
      raise TraceError(f"a convolution with padding {pad} at {where}; the Arch pads with zeros "
                       "(no negative padding, which crops)")
    name, out_space, y = self.kernel_layer(x, path, cout, where, "conv", int(kh), int(sh),
                                           compact_padding(pad))
    return _Act(y, out_space, tuple(eqn.outvars[0].aval.shape), fresh=name)

  def kernel_layer(self, x, path, cout, where, kind, *geometry):
    """A conv/dense layer reading ``x`` with the kernel leaf at ``path`` and ``cout`` outputs:
    its output space, the layer, the kernel's origin and its op. Returns (name, space, tensor).
    ``geometry``: a conv's kernel size, stride and padding."""
    name, ref = self.layer_name(path, where)
    out_space = self.new_space(cout, ref)
    self.layers.append(Layer(name, ref, kind, "?", "?", *geometry))
    self.layer_space[name] = (x.space, out_space)
    self.take(path, "params", name, "kernel")
    y = self.tmp()
    self.emit(Op(kind, (x.tensor,), y, layer=name))
    return name, out_space, y

  def p_dot_general(self, eqn, ins, where):
    x, w = ins
    if isinstance(w, _Act):
      raise TraceError(f"a product of two activations (attention or gating) at {where}")
    if isinstance(x, _Act) and x.spatial:
      return self.flattened_dense(eqn, x, w, where)
    x = self.flush(x, where)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if len(x.shape) == 4 and (x.shape[1:3] != (1, 1) or not x.flat):
      raise TraceError(f"a dense layer over a [B, H, W, C] = {x.shape} feature map at "
                       f"{where}; the Arch's dense layers read pooled [B, C] features")
    last = len(x.shape) - 1  # [B, C], or [B, 1, 1, C] after pooling with kept axes
    if tuple(lc) != (last,) or tuple(rc) != (0,) or lb or rb or np.ndim(w.val) != 2:
      raise TraceError(f"a dot_general with dimension numbers {eqn.params['dimension_numbers']}"
                       f" on {x.shape} at {where}; the Arch's dense layers are [B, C] x [C, O]")
    path = self.leaf_of(w, "dense kernel", where, 2)
    name, out_space, y = self.kernel_layer(x, path, np.shape(w.val)[1], where, "dense")
    return _Act(y, out_space, tuple(eqn.outvars[0].aval.shape), fresh=name, flat=True)

  def flattened_dense(self, eqn, x, w, where):
    """``dense(flatten([B, k, k, C]))`` as ``flatten(conv_kxk(x))``: the kernel [k*k*C, O] is
    the conv kernel [k, k, C, O] in NHWC flatten order (``trace.py`` reshapes it both ways)."""
    k, _, c = x.spatial
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if tuple(lc) != (1,) or tuple(rc) != (0,) or lb or rb or np.ndim(w.val) != 2:
      raise TraceError(f"a dot_general with dimension numbers {eqn.params['dimension_numbers']}"
                       f" on a flattened {k}x{k}x{c} map at {where}")
    path = self.leaf_of(w, "dense kernel", where, 2)
    name, out_space, y = self.kernel_layer(x, path, np.shape(w.val)[1], where, "conv", int(k),
                                           1, 0)
    z = self.tmp()
    self.emit(Op("flatten", (y,), z))
    self.flatten_at[z] = where
    return _Act(z, out_space, tuple(eqn.outvars[0].aval.shape), fresh=name, flat=True)

  def _affine(self, eqn, ins, where, op):
    a, b = ins
    if isinstance(a, _Act) and isinstance(b, _Act):
      if op == "add":
        return self.residual(eqn, a, b, where)
      if a is b and not a.pool:  # x * x, x / x: a function of one activation
        return self.elementwise(eqn, ins, where)
      raise TraceError(f"an elementwise {op} of two activations at {where}; the Arch joins "
                       "activations by residual addition only")
    act, p = (a, b) if isinstance(a, _Act) else (b, a)
    if act.pool:
      return self.pool_division(eqn, act, p, op, act is a, where)
    if not p.leaves:  # constants: exact identities pass; else part of an activation's program
      v = np.asarray(p.val)
      if np.shape(v) == () or np.size(v) == 1:
        if (op in ("add", "sub") and np.all(v == 0) or op in ("mul", "div") and np.all(v == 1)) \
            and (act is a or op in ("add", "mul")):
          out_shape = tuple(eqn.outvars[0].aval.shape)
          if out_shape == act.shape:
            return act  # the same object: its pending steps flush once
          return dataclasses.replace(self.flush(act, where), shape=out_shape)
      return self.elementwise(eqn, ins, where)
    if act is b and op in ("sub", "div"):
      raise TraceError(f"a {op} with the activation on the right at {where}")
    c = act.shape[-1]
    shape = np.shape(p.val)
    if len(shape) > len(act.shape) or any(d != 1 for d in shape[:-1]) or (
        shape and shape[-1] not in (1, c)):
      raise TraceError(f"an elementwise {op} with a value of shape {shape} on an activation of "
                       f"shape {act.shape} at {where}; only per-channel values are supported")
    if (op == "add" and act.fresh and not act.pend and p.pure is not None
        and p.pure[-1] != "mean" and np.size(p.val) == c and
        self.leaf_values[p.pure].shape == (c,) and
        p.pure[1:-1] == self.origin_module(act.fresh)):
      name = act.fresh
      i = next(i for i, l in enumerate(self.layers) if l.name == name)
      self.layers[i] = dataclasses.replace(self.layers[i], bias=True)
      self.take(p.pure, "params", name, "bias")
      return dataclasses.replace(act, fresh=None)
    return dataclasses.replace(act, pend=act.pend + ((op, p, where),), fresh=None)

  def pool_division(self, eqn, act, p, op, act_left, where):
    """A window sum divided by its window area: ``gap`` (whole image) or ``avgpool``."""
    v = np.asarray(p.val, np.float64)
    what = "a whole-image sum" if act.pooling is None else "a window sum (average pooling)"
    if op not in ("div", "mul") or p.leaves or not act_left and op == "div" or v.size == 0:
      raise TraceError(f"{what} followed by {op} at {where} is not an average")
    if not np.all(v == v.flat[0]):
      raise TraceError(f"{what} divided by a map of window counts at {where}: an average "
                       "pooling that leaves the padding out of its count (count_include_pad="
                       "False with padding); the Arch's average pooling divides by the window "
                       "area (count_include_pad=True, flax's and PyTorch's default)")
    f = float(v.flat[0])
    if not np.isclose(f if op == "mul" else 1.0 / f, 1.0 / act.pool, rtol=1e-6):
      raise TraceError(f"{what} over {act.pool} values followed by {op} {f:g} at {where} is not "
                       "an average")
    y = self.tmp()
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if act.pooling is None:
      self.emit(Op("gap", (act.tensor,), y))
      return _Act(y, act.space, out_shape, flat=True)
    window, stride, padding = act.pooling
    self.emit(Op("avgpool", (act.tensor,), y, window=window, stride=stride, padding=padding))
    return _Act(y, act.space, out_shape)

  # --------------------------------------------------------------------------- activations
  def elementwise(self, eqn, ins, where):
    """An elementwise primitive on one activation (and constants): extends an :class:`_Elem`.

    Two different activations (a residual add of a closed activation), or a variable (a
    BatchNorm after the activation), close the programs into ops and go to the handler.
    """
    name = eqn.primitive.name
    if any(isinstance(a, _Param) and a.leaves for a in ins):
      if name in _AFFINE and len(ins) == 2:
        return self._affine(eqn, [self.close(a) if isinstance(a, _Elem) else a for a in ins],
                            where, _AFFINE[name])
      leaves = sorted({_p(l) for a in ins if isinstance(a, _Param) for l in a.leaves})
      raise TraceError(f"an elementwise {name} of an activation and variables {leaves} at "
                       f"{where}; the Arch's activations have no learned parameters")
    acts = [self.flush(a, where) if isinstance(a, _Act) else a for a in ins]
    bases = {a.base.tensor if isinstance(a, _Elem) else a.tensor
             for a in acts if isinstance(a, (_Act, _Elem))}
    if len(bases) > 1:
      if name in ("add", "add_any"):
        return self._affine(eqn, [self.close(a) if isinstance(a, _Elem) else a for a in acts],
                            where, "add")
      raise TraceError(f"an elementwise {name} of two activations at {where} (gating or "
                       "attention); the Arch joins activations by residual addition only")
    elems = [a for a in acts if isinstance(a, _Elem)]
    base = elems[0].base if elems else next(a for a in acts if isinstance(a, _Act))
    fns = []
    for a in acts:
      if isinstance(a, _Elem):
        fns.append(a.fn)
      elif isinstance(a, _Act):
        fns.append(lambda b: b)
      else:
        fns.append(functools.partial(lambda v, b: v, jnp.asarray(a.val)))
    prim, params = eqn.primitive, _bind_params(eqn)

    def fn(b):
      return prim.bind(*[f(b) for f in fns], **params)
    prims = tuple(dict.fromkeys(sum((e.prims for e in elems), ()) + (name,)))
    calls = tuple(dict.fromkeys(sum((e.calls for e in elems), ()) + tuple(
        c for c in self.calls if c and not c.startswith("_"))))
    anchor = elems[0].anchor if elems else (self.ops[-1].output if self.ops else None)
    return _Elem(base, fn, tuple(eqn.outvars[0].aval.shape), prims, calls,
                 elems[0].where if elems else where, anchor)

  def close(self, e: _Elem) -> _Act:
    """The Arch op of an elementwise program: a registered activation, identified by value."""
    if id(e) in self.closed:
      return self.closed[id(e)][1]
    base = e.base
    n = int(np.prod(base.shape))
    grid = activations.probe_points()
    reps = -(-grid.size // n)
    xs = np.resize(grid, reps * n).reshape((reps,) + tuple(base.shape))
    try:
      ys = np.asarray(jax.vmap(e.fn)(jnp.asarray(xs)))
    except Exception as err:  # pylint: disable=broad-except
      raise TraceError(f"the elementwise program ({', '.join(e.prims)}) at {e.where} could not "
                       f"be evaluated: {type(err).__name__}: {err}") from None
    if ys.shape != xs.shape:
      raise TraceError(f"an elementwise program ({', '.join(e.prims)}) at {e.where} turns a "
                       f"{base.shape} activation into {e.shape}; activations keep the shape")
    if ys.dtype.kind == "f" and np.allclose(ys, xs, rtol=1e-6, atol=0):  # e.g. x * 1 + 0
      out = _Act(base.tensor, base.space, e.shape, flat=base.flat)
      self.closed[id(e)] = (e, out)
      return out
    found = activations.identify(xs, ys)
    if found is None:
      via = f" (in {', '.join(e.calls)})" if e.calls else ""
      hint = ""
      zero = ys.ravel()[np.argmin(np.abs(xs.ravel()))] if ys.dtype.kind == "f" else 0.0
      if ys.dtype.kind == "f" and abs(float(zero)) > 1e-6:
        hint = (f"; it maps 0 to {float(zero):g}, so a pruned (zeroed) channel would not stay "
                "zero")
      raise TraceError(
          f"an elementwise function of one activation, computed with "
          f"{', '.join(e.prims)}{via}, at {e.where} is none of the Arch's activations "
          f"({', '.join(activations.REGISTRY)}){hint}")
    name, alpha = found
    y = self.tmp()
    counted = self.count_relu and activations.REGISTRY[name].torch_counted
    if name == "relu":
      op = Op("relu", (base.tensor,), y, counted=self.count_relu)
    else:
      op = Op("act", (base.tensor,), y, counted=counted, fn=name, alpha=alpha)
    self.emit(op)
    self.ops.pop()
    at = next((i + 1 for i, o in enumerate(self.ops) if o.output == e.anchor), 0)
    self.ops.insert(at, op)
    out = _Act(y, base.space, e.shape, flat=base.flat)
    self.closed[id(e)] = (e, out)
    return out

  def origin_module(self, layer):
    return self.origin[("params", layer, "kernel")][0][1:-1]

  def p_add(self, eqn, ins, where):
    return self._affine(eqn, ins, where, "add")

  def p_add_any(self, eqn, ins, where):
    return self._affine(eqn, ins, where, "add")

  def p_sub(self, eqn, ins, where):
    return self._affine(eqn, ins, where, "sub")

  def p_mul(self, eqn, ins, where):
    return self._affine(eqn, ins, where, "mul")

  def p_div(self, eqn, ins, where):
    return self._affine(eqn, ins, where, "div")

  def residual(self, eqn, a, b, where):
    a, b = self.flush(a, where), self.flush(b, where)
    if a.shape != b.shape:
      raise TraceError(f"a residual addition of shapes {a.shape} and {b.shape} at {where}")
    if len(a.shape) != 4:
      raise TraceError(f"a residual addition of [B, C] features at {where}")
    if a.tensor == b.tensor:
      raise TraceError(f"x + x at {where}: a constant scaling, not a residual join")
    # the main branch is the deeper one (more convolutions since the input)
    if self.conv_depth[b.tensor] > self.conv_depth[a.tensor]:
      a, b = b, a
    s = self.union(a.space, b.space)
    self.mark_shortcut(a.tensor, b.tensor)
    y = self.tmp()
    self.emit(Op("add", (a.tensor, b.tensor), y))
    return _Act(y, s, a.shape, flat=a.flat)

  def ancestors(self, t):
    seen, stack = set(), [t]
    while stack:
      u = stack.pop()
      if u in seen:
        continue
      seen.add(u)
      if u in self.producer:
        stack.extend(self.producer[u].inputs)
    return seen

  def mark_shortcut(self, main, sc):
    """Marks a projection shortcut (conv [+ bn] from a tensor the main branch also reads)."""
    main_anc = self.ancestors(main)
    chain, t = [], sc
    while t not in main_anc:
      op = self.producer.get(t)
      if op is None:
        return
      chain.append(op)
      t = op.inputs[0]
    kinds = [op.op for op in reversed(chain)]
    if kinds not in (["conv"], ["conv", "bn"]):
      return
    for op in chain:
      i = next(i for i, l in enumerate(self.layers) if l.name == op.layer)
      self.layers[i] = dataclasses.replace(self.layers[i], shortcut=True)

  @staticmethod
  def pool_window(kind, act, p, where) -> tuple[int, int, Any]:
    """``(window, stride, padding)`` of a pooling ``reduce_window`` the Arch can express."""
    win, st = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    pad = tuple(tuple(int(v) for v in q) for q in p["padding"])
    dil = tuple(p["base_dilation"]) + tuple(p["window_dilation"])
    if act.flat or len(win) != 4 or win[0] != 1 or win[3] != 1 or st[0] != 1 or st[3] != 1 or \
        pad[0] != (0, 0) or pad[3] != (0, 0) or any(d != 1 for d in dil):
      raise TraceError(f"{kind} with window {win}, strides {st}, padding {pad} over a "
                       f"{act.shape} tensor at {where}; the Arch pools [B, H, W, C] maps over "
                       "the spatial axes only")
    if win[1] != win[2] or st[1] != st[2]:
      raise TraceError(f"{kind} with window {win[1:3]}, strides {st[1:3]} at {where}; the "
                       "Arch's pooling windows are square, with equal strides")
    if min(v for q in pad for v in q) < 0:
      raise TraceError(f"{kind} with negative padding {pad} at {where}")
    return int(win[1]), int(st[1]), compact_padding(pad[1:3])

  def p_reduce_window_max(self, eqn, ins, where):
    (act,) = ins
    act = self.flush(act, where)
    window, stride, padding = self.pool_window("a max pooling", act, eqn.params, where)
    y = self.tmp()
    self.emit(Op("maxpool", (act.tensor,), y, window=window, stride=stride, padding=padding))
    return _Act(y, act.space, tuple(eqn.outvars[0].aval.shape))

  def p_reduce_window_sum(self, eqn, ins, where):
    (act,) = ins
    act = self.flush(act, where)
    p = eqn.params
    h, w = act.shape[1:3] if len(act.shape) == 4 else (0, 0)
    out = tuple(eqn.outvars[0].aval.shape)
    if (not act.flat and tuple(p["window_dimensions"]) == (1, h, w, 1) and
        all(tuple(q) == (0, 0) for q in p["padding"])):
      return _Act(act.tensor, act.space, out, pool=h * w)  # global: gap once divided
    window, stride, padding = self.pool_window("an average pooling", act, p, where)
    return _Act(act.tensor, act.space, out, pool=window * window,
                pooling=(window, stride, padding))

  def p_reduce_sum(self, eqn, ins, where):
    (act,) = ins
    act = self.flush(act, where)
    axes = tuple(sorted(eqn.params["axes"]))
    if len(act.shape) != 4 or axes != (1, 2) or act.flat:
      what = (" (a normalisation or softmax over channels: LayerNorm, GroupNorm, ...)"
              if len(act.shape) - 1 in axes else "")
      raise TraceError(f"a sum over axes {axes} of a {act.shape} tensor{what} at {where}; only "
                       "a mean over the spatial axes (global average pooling) is supported")
    return _Act(act.tensor, act.space, tuple(eqn.outvars[0].aval.shape),
                pool=act.shape[1] * act.shape[2])

  def p_reshape(self, eqn, ins, where):
    act = ins[0]
    new = tuple(eqn.outvars[0].aval.shape)
    old = act.shape
    if new == old:
      return act
    # only unit spatial axes come and go: [B, 1, 1, C] <-> [B, C]
    if old[0] == new[0] and old[-1] == new[-1] and all(d == 1 for d in old[1:-1]) and \
        all(d == 1 for d in new[1:-1]) and len(new) in (2, 4):
      return dataclasses.replace(act, shape=new)
    if len(old) == 4 and len(new) == 2 and new[1] == old[1] * old[2] * old[3]:
      if old[1] != old[2] or act.pool or act.flat or act.spatial:
        raise TraceError(f"a flatten of a {old[1]}x{old[2]}x{old[3]} feature map into {new[1]} "
                         f"features at {where}: only square maps flatten (into a dense layer, "
                         "described as a convolution whose kernel covers the map)")
      # a dense layer must read it: p_dot_general describes the pair as a conv with an HxW
      # kernel (the same arithmetic in NHWC flatten order) and a flatten of its 1x1 output
      return dataclasses.replace(self.flush(act, where), shape=new, spatial=old[1:])
    raise TraceError(f"a channel-mixing reshape {old} -> {new} at {where}")

  def p_squeeze(self, eqn, ins, where):
    return self.p_reshape(eqn, ins, where)

  def p_expand_dims(self, eqn, ins, where):
    return self.p_reshape(eqn, ins, where)

  def p_broadcast_in_dim(self, eqn, ins, where):
    if tuple(eqn.outvars[0].aval.shape) == ins[0].shape:
      return ins[0]
    return self.p_reshape(eqn, ins, where)

  def p_convert_element_type(self, eqn, ins, where):
    if eqn.params["new_dtype"] != jnp.float32:
      raise TraceError(f"a conversion to {eqn.params['new_dtype']} at {where}; traced networks "
                       "compute in float32")
    return ins[0]

  def p_stop_gradient(self, eqn, ins, where):
    return ins[0]

  def p_copy(self, eqn, ins, where):
    return ins[0]

  p_copy_p = p_copy

  def p_optimization_barrier(self, eqn, ins, where):
    return list(ins)

  def p_concatenate(self, eqn, ins, where):
    raise TraceError(f"a concatenation at {where}; the Arch's channel spaces cannot be "
                     "concatenated (DenseNet/Inception-style joins are not supported)")

  def p_transpose(self, eqn, ins, where):
    raise TraceError(f"a transpose (permutation {eqn.params['permutation']}) at {where}; "
                     "traced networks are NHWC throughout")


def _describe(name: str) -> str:
  if name in _ELEMENTWISE:
    return " (an elementwise function the Arch's activations do not use)"
  if name in ("dot_general",):
    return " (attention)"
  if "random" in name or "threefry" in name:
    return " (random numbers: the inference forward pass must be deterministic)"
  return ""


def _bind_params(eqn) -> dict:
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # older jax: (subfuns, params)
    params = params[1]
  return params


def _p(path) -> str:
  return "/".join(str(k) for k in path)
