"""The core of issue 3: architecture, graph bijection, reference import, MACs, groups, masks.

Fixture tests compare against the reference implementation's outputs on fixed weights (the
reference fixtures, found through ``$METAPRUNE_REFERENCE_FIXTURES``: tests/_fixtures.py);
property tests draw random uneven widths and masks with hypothesis and check that the graph round
trip is bit-exact and that a masked network computes what its materialised version computes.
"""

import collections
import functools
import json
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprune_jax.backends import xla_hints
from metaprune_jax.graphs import device_layout
from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.nets import arch as arch_lib
from metaprune_jax.nets import cnn
from metaprune_jax.nets import macs as macs_lib
from metaprune_jax.nets import reference
from metaprune_jax.nets import zoo
from metaprune_jax.prune import groups as groups_lib
from metaprune_jax.prune import masks as masks_lib

# Every new width compiles new programs, so examples are few; deep networks get fewer.
_EXAMPLES = {"resnet_tiny": 4, "resnet20": 3, "resnet56": 2, "vgg19": 3, "resnet50": 2}


def _settings(name):
  return hypothesis.settings(max_examples=_EXAMPLES[name], deadline=None, derandomize=True,
                             phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
                             suppress_health_check=list(hypothesis.HealthCheck))

# (case folder, reference model name, num classes, NCHW input shape for the MAC count)
_CASES = {
    "resnet56_c10_pruned": ("resnet56", 10, (1, 3, 32, 32)),
    "vgg19_c100_small": ("VGG19", 100, (1, 3, 32, 32)),
    "resnet50_imagenet_pruned": ("resnet50", 1000, (1, 3, 224, 224)),
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _load_npz(path):
  with np.load(path) as z:
    return collections.OrderedDict((k, z[k]) for k in z.files)


@functools.lru_cache(maxsize=None)
def _case(fixtures, case):
  """``(state_dict, arch, variables)`` of a fixture case (imported once per session)."""
  ref_name, num_classes, _ = _CASES[case]
  sd = _load_npz(fixtures / case / "model.npz")
  arch, variables = reference.import_reference_model(sd, ref_name, num_classes)
  return sd, arch, variables


def _random_variables(arch, seed):
  """Variables with every leaf random (BN statistics and scales too, variances positive)."""
  rng = np.random.default_rng(seed)
  out = {"params": {}, "batch_stats": {}}
  for coll, shapes in (("params", arch.param_shapes()), ("batch_stats", arch.stat_shapes())):
    for layer, leaves in shapes.items():
      out[coll][layer] = {}
      for leaf, shape in leaves.items():
        a = rng.standard_normal(shape).astype(np.float32)
        if leaf == "kernel":
          a *= np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))
        elif leaf == "var":
          a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf == "scale":
          a = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        out[coll][layer][leaf] = jnp.asarray(a)
  return out


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_close_rel(actual, expected, rtol):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = max(np.max(np.abs(expected)), 1e-12)
  err = np.max(np.abs(actual - expected)) / scale if expected.size else 0.0
  assert err <= rtol, f"max error {err:.3g} relative to max |expected| exceeds {rtol}"


def _tiny_archs():
  """Every zoo architecture, small enough for CPU property tests."""
  return {
      "resnet_tiny": zoo.get_arch("resnet_tiny", 10),
      "resnet20": zoo.get_arch("resnet20", 10, width_mult=0.5),
      "resnet56": zoo.get_arch("resnet56", 10, width_mult=0.25),
      "vgg19": zoo.get_arch("vgg19", 10, cfg=((8, 8), (8, 8), (8,) * 4, (8,) * 4, (8,) * 4)),
      "resnet50": zoo.get_arch("resnet50", 7, width_mult=0.125),
  }


_ARCHS = _tiny_archs()


def _random_widths(draw, arch, low=1):
  """One width per prunable space, so residual-coupled layers share a width by construction."""
  return arch.with_widths({s: draw(st.integers(low, max(low, arch.width(s))))
                           for s in arch.prunable_spaces})


@st.composite
def _uneven_arch(draw, name):
  return _random_widths(draw, _ARCHS[name])


@st.composite
def _random_keep(draw, arch):
  """``{space: sorted kept indices}``, at least one channel per prunable space."""
  keep = {}
  for s in arch.prunable_spaces:
    w = arch.width(s)
    bits = draw(st.lists(st.booleans(), min_size=w, max_size=w))
    k = np.flatnonzero(bits)
    if len(k) == 0:
      k = np.array([draw(st.integers(0, w - 1))])
    keep[s] = k
  return keep


def _toy_resnet(num_classes=5, widths=(4, 6)):
  """The extensibility demo: a 3-block ResNet written only here, with one projection shortcut."""
  b = arch_lib.Builder()
  b.space(arch_lib.INPUT, 3)
  s = b.space("a", widths[0])
  x = b.relu(b.bn(b.conv("x", "stem", arch_lib.INPUT, s, 3), "stem_bn", s), counted=True)
  for j, (width, stride) in enumerate(((widths[0], 1), (widths[1], 2), (widths[1], 1))):
    out = b.space("a" if width == widths[0] else "b", width)
    inner = b.space(f"blk{j}.inner", width)
    y = b.relu(b.bn(b.conv(x, f"blk{j}.c1", s, inner, 3, stride), f"blk{j}.n1", inner), True)
    y = b.bn(b.conv(y, f"blk{j}.c2", inner, out, 3), f"blk{j}.n2", out)
    if out != s:
      sc = b.conv(x, f"blk{j}.proj", s, out, 1, stride, 0, shortcut=True)
      sc = b.bn(sc, f"blk{j}.proj_bn", out, shortcut=True)
    else:
      sc = x
    x = b.relu(b.add(y, sc), counted=False)
    s = out
  x = b.gap(x)
  b.space(arch_lib.CLASSES, num_classes)
  b.dense(x, "head", s, arch_lib.CLASSES)
  return b.build(name="toy_resnet", ref_name="toy_resnet", num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# Reference fixtures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_logits(FIXTURES, case):
  _, arch, variables = _case(FIXTURES, case)
  io = _load_npz(FIXTURES / case / "io.npz")
  logits = jax.jit(cnn.apply_model, static_argnums=0)(
      arch, variables, jnp.asarray(io["x"].transpose(0, 2, 3, 1)))
  _assert_close_rel(logits, io["logits"], 1e-4)


@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_graph(FIXTURES, case):
  _, arch, variables = _case(FIXTURES, case)
  ref = _load_npz(FIXTURES / case / "graph.npz")
  ours = graph_lib.graph_to_reference_arrays(arch, graph_lib.to_graph(arch, variables))
  expected_keys = {k for k in ref if k != "node_index"}
  assert set(ours) == expected_keys
  for k in sorted(expected_keys):
    assert ours[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  # node_index: the reference's layer boundaries are our node sets'
  layout = graph_lib.graph_layout(arch)
  bounds = [0] + [start + count for _, _, start, count in layout.node_sets]
  np.testing.assert_array_equal(bounds, ref["node_index"])
  # the reference's own graph, read back, is the imported network bit for bit
  _assert_trees_equal(graph_lib.from_graph(arch, graph_lib.graph_from_reference_arrays(arch, ref)),
                      variables)


@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_macs(FIXTURES, case):
  _, arch, _ = _case(FIXTURES, case)
  ref_name, num_classes, input_shape = _CASES[case]
  ref = json.loads((FIXTURES / case / "macs.json").read_text())
  assert tuple(ref["example_input_shape"]) == input_shape
  assert macs_lib.count_macs(arch, input_shape) == (int(ref["macs"]), int(ref["params"]))
  full = zoo.get_arch(ref_name, num_classes)  # get_arch reads reference names (any case)
  assert macs_lib.count_macs(full, input_shape) == (int(ref["full_width_macs"]),
                                                    int(ref["full_width_params"]))


@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_export_inverts_import(FIXTURES, case):
  sd, arch, variables = _case(FIXTURES, case)
  out = reference.export_reference_state_dict(arch, variables)
  assert list(out) == list(sd)
  for k in sd:
    assert out[k].dtype == sd[k].dtype, k
    np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_import_with_num_batches_tracked(FIXTURES, case):
  sd, arch, variables = _case(FIXTURES, case)
  ref_name, num_classes, _ = _CASES[case]
  meta = json.loads((FIXTURES / case / "meta.json").read_text())
  full = collections.OrderedDict(
      (k, sd[k] if k in sd else np.array(1, np.int64)) for k in meta["state_dict_keys_full"])
  assert len(full) > len(sd)
  arch2, variables2 = reference.import_reference_model(full, ref_name.upper(), num_classes)
  assert arch2 == arch
  _assert_trees_equal(variables2, variables)
  exported = reference.export_reference_state_dict(arch, variables, num_batches_tracked=True)
  assert list(exported) == meta["state_dict_keys_full"]


@pytest.mark.parametrize("case", list(_CASES))
def test_fixture_groups_and_importance(FIXTURES, case):
  _, arch, variables = _case(FIXTURES, case)
  ref = json.loads((FIXTURES / case / "importance_groups.json").read_text())
  imp = _load_npz(FIXTURES / case / "importance.npz")
  groups = groups_lib.pruning_groups(arch)
  assert [g.root for g in groups] == [g["root"] for g in ref["groups"]]
  assert [g.width for g in groups] == [g["num_channels"] for g in ref["groups"]]
  importance = jax.jit(groups_lib.group_importance, static_argnums=(0, 2))
  normed = importance(arch, variables, "max")
  raw = importance(arch, variables, "none")
  for i in range(len(groups)):
    _assert_close_rel(normed[i], imp[f"group_{i:03d}"], 1e-5)
    _assert_close_rel(raw[i], imp[f"raw_group_{i:03d}"], 1e-5)


# ---------------------------------------------------------------------------------------------
# Graph round trip at random uneven widths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_ARCHS))
def test_round_trip_bit_exact(name):

  @_settings(name)
  @hypothesis.given(arch=_uneven_arch(name), seed=st.integers(0, 2**16))
  def check(arch, seed):
    variables = _random_variables(arch, seed)
    graph = graph_lib.to_graph(arch, variables)
    layout = graph_lib.graph_layout(arch)
    assert graph.nodes.shape == layout.node_gather.shape
    assert graph.senders.dtype == jnp.int32 and graph.receivers.dtype == jnp.int32
    _assert_trees_equal(graph_lib.from_graph(arch, graph), variables)

  check()


def _reference_block_edges(arch, variables, layer, dim):
  """The reference's (out-major) edge features of one conv/dense layer, by numpy alone."""
  k = np.asarray(variables["params"][layer]["kernel"])
  if k.ndim == 4:  # HWIO -> OIHW rows
    rows = np.transpose(k, (3, 2, 0, 1)).reshape(k.shape[3] * k.shape[2], -1)
  else:  # [in, out] -> [out, in]
    rows = k.T.reshape(-1, 1)
  if rows.shape[1] != dim:
    rows = np.pad(rows, ((0, 0), (dim // 2, dim // 2)))
  return rows


@pytest.mark.parametrize("name", list(_ARCHS))
def test_reference_arrays_follow_the_reference_edge_order(name):
  """``graph_to_reference_arrays`` puts every layer's edges out-major, in-minor (docs/design.md 3),
  with the kernel slices W[o, i] computed here by numpy, whatever order the graph holds; and
  ``graph_from_reference_arrays`` is its exact inverse."""
  arch = _ARCHS[name].with_widths(
      {s: max(1, _ARCHS[name].width(s) - 1 - j % 3)
       for j, s in enumerate(_ARCHS[name].prunable_spaces)})
  variables = _random_variables(arch, 11)
  graph = graph_lib.to_graph(arch, variables)
  ref = graph_lib.graph_to_reference_arrays(arch, graph)
  layout = graph_lib.graph_layout(arch)
  kind_start = np.concatenate([[0], np.cumsum(layout.num_edges)])
  sets = layout.node_sets
  checked = 0
  for lname, ki, start, count, dst, src in layout.edge_blocks:
    if lname.startswith("identity:"):
      continue
    dim = layout.edge_kinds[ki]
    key = "edge_features" if arch.edge_style == "single" else f"edge_features_{dim}"
    o_nodes = sets[dst][2] + np.arange(sets[dst][3])
    i_nodes = sets[src][2] + np.arange(sets[src][3])
    g0 = kind_start[ki] + start
    np.testing.assert_array_equal(ref["edge_index"][0, g0:g0 + count],
                                  np.repeat(o_nodes, len(i_nodes)), err_msg=lname)
    np.testing.assert_array_equal(ref["edge_index"][1, g0:g0 + count],
                                  np.tile(i_nodes, len(o_nodes)), err_msg=lname)
    np.testing.assert_array_equal(ref[key][start:start + count],
                                  _reference_block_edges(arch, variables, lname, dim),
                                  err_msg=lname)
    checked += 1
  assert checked == sum(1 for l in arch.layers if l.kind in ("conv", "dense"))
  back = graph_lib.graph_from_reference_arrays(arch, ref)
  _assert_trees_equal(back._replace(n_node=None, n_edge=None),
                      graph._replace(n_node=None, n_edge=None))
  _assert_trees_equal(graph_lib.from_graph(arch, back), variables)


def test_graph_from_reference_arrays_rejects_other_graphs():
  arch = _ARCHS["resnet_tiny"]
  ref = graph_lib.graph_to_reference_arrays(arch, graph_lib.to_graph(arch, _random_variables(arch, 0)))
  narrower = arch.with_widths({"layer1.0.conv1": arch.width("layer1.0.conv1") - 1})
  with pytest.raises(ValueError, match="edge_index"):
    graph_lib.graph_from_reference_arrays(narrower, ref)
  with pytest.raises(ValueError, match="lack"):
    graph_lib.graph_from_reference_arrays(arch, {k: v for k, v in ref.items()
                                                 if k != "edge_features"})
  bad = dict(ref, edge_features=ref["edge_features"][:, :4])
  with pytest.raises(ValueError, match="edge_features"):
    graph_lib.graph_from_reference_arrays(arch, bad)


def test_from_graph_rejects_a_graph_in_the_reference_edge_order():
  """A GraphsTuple built straight from reference arrays has our shapes but not our edge order:
  from_graph refuses it (naming the fix) instead of returning scrambled kernels."""
  arch = _ARCHS["resnet50"]
  variables = _random_variables(arch, 3)
  graph = graph_lib.to_graph(arch, variables)
  ref = graph_lib.graph_to_reference_arrays(arch, graph)
  raw = graph._replace(edges=tuple(ref[f"edge_features_{k}"] for k in (49, 9, 1)),
                       senders=ref["edge_index"][0].astype(np.int32),
                       receivers=ref["edge_index"][1].astype(np.int32))
  with pytest.raises(ValueError, match="graph_from_reference_arrays"):
    graph_lib.from_graph(arch, raw)
  # the same topology as fresh (non-identical) arrays is accepted, bit for bit
  copied = graph._replace(senders=np.array(graph.senders), receivers=np.array(graph.receivers))
  _assert_trees_equal(graph_lib.from_graph(arch, copied), variables)


def test_graph_conversion_first_called_under_jit():
  """The per-architecture device layout is cached; building it inside a trace (to_graph under
  jit, as a user's jitted loss does) must not leave tracers in that cache: later eager and
  jitted calls for the same architecture still work and agree bit for bit."""
  arch = zoo.get_arch("resnet20", 10, width_mult=0.125)
  variables = _random_variables(arch, 3)
  device_layout.device_layout.cache_clear()
  # private: the test starts from empty caches, and the graph reader's cache (which the trace
  # must not fill with tracers) has no public handle
  graph_lib._graph_reader.cache_clear()  # pylint: disable=protected-access
  jitted = jax.jit(lambda v: graph_lib.from_graph(arch, graph_lib.to_graph(arch, v)))
  _assert_trees_equal(jitted(variables), variables)
  eager = graph_lib.to_graph(arch, variables)
  again = jax.jit(lambda v: graph_lib.to_graph(arch, v))(variables)
  np.testing.assert_array_equal(eager.nodes, again.nodes)
  for a, b in zip(eager.edges, again.edges):
    np.testing.assert_array_equal(a, b)
  _assert_trees_equal(graph_lib.from_graph(arch, eager), variables)


def test_split_rows_values_and_gradient_equal_slices():
  """``split_rows`` cuts the same rows as slices (in the order asked, gaps and tails left out),
  and its gradient is the slices' gradient; overlapping pieces are refused."""
  rng = np.random.default_rng(0)
  arrays = [jnp.asarray(rng.standard_normal((40, 3), np.float32)),
            jnp.asarray(rng.standard_normal((7, 2), np.float32))]
  pieces = [(0, 30, 5), (1, 0, 7), (0, 2, 10), (0, 12, 3)]
  weights = [jnp.asarray(rng.standard_normal((c, a.shape[1]), np.float32))
             for (k, _, c), a in zip(pieces, [arrays[k] for k, _, _ in pieces])]

  def by_slices(arrs):
    return [jax.lax.slice_in_dim(arrs[k], s, s + c) for k, s, c in pieces]

  def loss(fn, arrs):
    return sum(jnp.sum(w * p) for w, p in zip(weights, fn(arrs)))

  for got, want in zip(graph_lib.split_rows(arrays, pieces), by_slices(arrays)):
    np.testing.assert_array_equal(got, want)
  g_split = jax.grad(functools.partial(loss, lambda a: graph_lib.split_rows(a, pieces)))(arrays)
  g_slice = jax.grad(functools.partial(loss, by_slices))(arrays)
  for a, b in zip(g_split, g_slice):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="overlapping"):
    graph_lib.split_rows(arrays, [(0, 0, 5), (0, 4, 2)])


def test_arch_hash_is_cached_and_not_pickled():
  """``Arch`` caches its hash (a jit static argument and cache key on every call); a pickled
  copy equals the original and hashes like a fresh object, never with a stale cached value."""
  import pickle  # pylint: disable=g-import-not-at-top
  arch = zoo.get_arch("resnet20", 10, width_mult=0.25)
  h = hash(arch)
  assert arch.__dict__["_hash"] == h and hash(arch) == h
  state = arch.__getstate__()
  assert "_hash" not in state
  copy = pickle.loads(pickle.dumps(arch))
  assert copy == arch and "_hash" not in copy.__dict__ and hash(copy) == h
  assert {arch: 1}[copy] == 1
  assert hash(arch.with_widths(dict(arch.widths))) == h


def test_round_trip_preserves_every_bit_pattern():
  """Negative zeros, denormals, infinities and NaN payloads survive the round trip."""
  arch = _ARCHS["resnet_tiny"]
  variables = _random_variables(arch, 0)
  k = np.array(variables["params"]["conv1"]["kernel"])
  special = np.array([-0.0, 1e-45, np.inf, -np.inf, np.nan], np.float32)
  k.reshape(-1)[:len(special)] = special
  variables["params"]["conv1"]["kernel"] = jnp.asarray(k)
  back = graph_lib.from_graph(arch, graph_lib.to_graph(arch, variables))
  np.testing.assert_array_equal(np.asarray(back["params"]["conv1"]["kernel"]).view(np.uint32),
                                k.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# Masks == materialisation
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _jit_apply(train):
  return jax.jit(functools.partial(cnn.apply_model, train=train), static_argnums=0)


@pytest.mark.parametrize("name", list(_ARCHS))
def test_masked_equals_materialized(name):

  @_settings(name)
  @hypothesis.given(data=st.data(), seed=st.integers(0, 2**16))
  def check(data, seed):
    arch = _ARCHS[name]
    keep = data.draw(_random_keep(arch))
    masks = masks_lib.masks_from_keep(arch, keep)
    variables = _random_variables(arch, seed)
    # ResNet-50 reaches 1x1 at 32x32; train-mode BN over 2 values is ill-conditioned there
    size, batch = (64, 4) if name == "resnet50" else (32, 2)
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))
    masked = masks_lib.mask_variables(arch, variables, masks)
    small_arch, small = masks_lib.materialize(arch, variables, masks)
    assert small_arch.width_map == {s: (len(keep[s]) if s in keep else arch.width(s))
                                    for s in arch.spaces}
    # eval mode
    _assert_close_rel(_jit_apply(False)(arch, masked, x, masks=masks),
                      _jit_apply(False)(small_arch, small, x), 1e-5)
    # train mode: logits and the batch statistics of the kept channels
    logits_m, stats_m = _jit_apply(True)(arch, masked, x, masks=masks)
    logits_s, stats_s = _jit_apply(True)(small_arch, small, x)
    _assert_close_rel(logits_m, logits_s, 1e-5)
    for l in arch.layers:
      if l.kind == "bn":
        k = keep.get(l.out_space, np.arange(arch.width(l.out_space)))
        for leaf in ("mean", "var"):
          # running variances of a 56-layer net at width 1 drift by float32 rounding
          _assert_close_rel(np.asarray(stats_m[l.name][leaf])[k], stats_s[l.name][leaf], 1e-4)

  check()


# ---------------------------------------------------------------------------------------------
# Padding: a masked network embedded at full width gives the materialised network's graph
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet_tiny", "vgg19", "resnet50"])
def test_padded_layout_of_embedded_network(name):

  @_settings(name)
  @hypothesis.given(data=st.data(), seed=st.integers(0, 2**16))
  def check(data, seed):
    full = _ARCHS[name]
    keep = data.draw(_random_keep(full))
    small_arch = full.with_widths({s: len(k) for s, k in keep.items()})
    small = _random_variables(small_arch, seed)
    embedded, masks = masks_lib.embed(full, small, keep)
    budget = graph_lib.graph_layout(full)
    layout = graph_lib.graph_layout(full, keep=keep, pad_to=budget)
    assert layout.num_nodes == budget.num_nodes and layout.num_edges == budget.num_edges
    flat = graph_lib.flatten_variables(full, embedded)
    padded = jax.jit(graph_lib.graph_from_flat)(layout.arrays(), flat)
    want = graph_lib.to_graph(small_arch, small)
    want_layout = graph_lib.graph_layout(small_arch)
    assert layout.num_real_nodes == want_layout.num_real_nodes
    assert layout.num_real_edges == want_layout.num_real_edges
    np.testing.assert_array_equal(padded.nodes[:layout.num_real_nodes], want.nodes)
    start, want_start = 0, 0
    for e_pad, e_want, n_real in zip(padded.edges, want.edges, layout.num_real_edges):
      np.testing.assert_array_equal(e_pad[:n_real], e_want)
      np.testing.assert_array_equal(
          padded.senders[start:start + n_real], want.senders[want_start:want_start + n_real])
      np.testing.assert_array_equal(
          padded.receivers[start:start + n_real], want.receivers[want_start:want_start + n_real])
      # padding edges carry zero features and join the last (padding) node to itself
      assert not np.any(np.asarray(e_pad[n_real:]))
      assert np.all(np.asarray(padded.senders[start + n_real:start + e_pad.shape[0]])
                    == layout.num_nodes - 1)
      start += e_pad.shape[0]
      want_start += e_want.shape[0]
    assert not np.any(np.asarray(padded.nodes[layout.num_real_nodes:]))
    # the way back writes exactly the kept slices
    back = graph_lib.flat_from_graph(layout.arrays(), padded, layout.flat_size)
    _assert_trees_equal(graph_lib.unflatten_variables(full, back),
                        masks_lib.mask_variables(full, embedded, masks))

  check()


# ---------------------------------------------------------------------------------------------
# MACs: closed forms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,stride,bias,size", [(3, 1, False, 8), (3, 2, True, 9),
                                                     (1, 2, False, 7), (5, 1, True, 6)])
def test_macs_single_conv_closed_form(kernel, stride, bias, size):
  cin, cout, classes = 3, 6, 4
  b = arch_lib.Builder()
  b.space(arch_lib.INPUT, cin)
  s = b.space("c", cout)
  x = b.conv("x", "conv", arch_lib.INPUT, s, kernel, stride, kernel // 2, bias=bias)
  x = b.relu(b.bn(x, "bn", s), counted=True)
  x = b.gap(x)
  b.space(arch_lib.CLASSES, classes)
  b.dense(x, "fc", s, arch_lib.CLASSES)
  arch = b.build(name="one_conv", ref_name="one_conv", num_classes=classes)
  ho = (size + 2 * (kernel // 2) - kernel) // stride + 1
  out = cout * ho * ho
  conv = kernel * kernel * cin * out + (out if bias else 0)
  want_macs = conv + 2 * out + out + out + (cout * classes + classes)  # conv, bn, relu, gap, fc
  want_params = kernel * kernel * cin * cout + (cout if bias else 0) + 2 * cout + \
      cout * classes + classes
  assert macs_lib.count_macs(arch, (1, cin, size, size)) == (want_macs, want_params)
  # the same count as a jittable function of the widths
  mac_terms, _ = macs_lib.count_terms(arch, (1, cin, size, size))
  widths = jnp.asarray([arch.width(s) for s in arch.spaces], jnp.float32)
  got = jax.jit(functools.partial(macs_lib.macs_of_counts, mac_terms))(widths)
  np.testing.assert_allclose(float(got), want_macs, rtol=1e-6)


def test_macs_resnet56_published():
  assert macs_lib.count_macs(zoo.get_arch("resnet56", 10)) == (127_115_914, 855_770)


# ---------------------------------------------------------------------------------------------
# Extensibility: a network described only here gets everything
# ---------------------------------------------------------------------------------------------
def test_network_defined_in_test_gets_graph_macs_groups():
  arch = _toy_resnet()
  # graph: bit-exact both ways, at the written and at other widths
  for widths in ({}, {"a": 2, "b": 5, "blk0.inner": 1, "blk1.inner": 3, "blk2.inner": 6}):
    a = arch.with_widths(widths)
    variables = _random_variables(a, 1)
    graph = graph_lib.to_graph(a, variables)
    w = a.width_map
    num_nodes = 3 + w["a"] * 2 + w["blk0.inner"] + w["blk1.inner"] + w["b"] + \
        w["blk2.inner"] + w["b"] + w["classes"]
    assert graph.nodes.shape == (num_nodes, 8)
    _assert_trees_equal(graph_lib.from_graph(a, graph), variables)
  # MACs by hand at 1x3x8x8 (stride-2 block 1: 8x8 -> 4x4)
  a, b_, classes = 4, 6, 5
  hw1, hw2 = 64, 16
  conv3 = lambda cin, cout, hw: 9 * cin * cout * hw  # noqa: E731
  macs = (conv3(3, a, hw1) + 2 * a * hw1 + a * hw1  # stem conv, bn, relu
          + conv3(a, a, hw1) + 2 * a * hw1 + a * hw1 + conv3(a, a, hw1) + 2 * a * hw1  # block 0
          + conv3(a, b_, hw2) + 3 * b_ * hw2 + conv3(b_, b_, hw2) + 2 * b_ * hw2  # block 1
          + a * b_ * hw2 + 2 * b_ * hw2  # projection conv + bn
          + conv3(b_, b_, hw2) + 3 * b_ * hw2 + conv3(b_, b_, hw2) + 2 * b_ * hw2  # block 2
          + b_ * hw2 + b_ * classes + classes)  # gap, head
  params = (27 * a + 2 * a + 2 * (9 * a * a + 2 * a) + 9 * a * b_ + 9 * b_ * b_ + 4 * b_
            + a * b_ + 2 * b_ + 2 * (9 * b_ * b_ + 2 * b_) + b_ * classes + classes)
  assert macs_lib.count_macs(arch, (1, 3, 8, 8)) == (macs, params)
  # groups: the two residual streams and the three inner spaces, Torch-Pruning's order
  groups = groups_lib.pruning_groups(arch)
  assert sorted(g.space for g in groups) == sorted(
      ["a", "b", "blk0.inner", "blk1.inner", "blk2.inner"])
  stream_b = next(g for g in groups if g.space == "b")
  assert {(m.layer, m.role) for m in stream_b.members} == {
      ("blk1_c2", "out"), ("blk1_n2", "out"), ("blk1_proj", "out"), ("blk1_proj_bn", "out"),
      ("blk2_c1", "in"), ("blk2_c2", "out"), ("blk2_n2", "out"), ("head", "in")}
  assert groups[0].root == "blk1.proj"  # the shortcut operand is walked first
  imp = groups_lib.group_importance(arch, _random_variables(arch, 2))
  assert [i.shape for i in imp] == [(g.width,) for g in groups]
  # and the model runs, masked == materialised
  variables = _random_variables(arch, 3)
  masks = masks_lib.masks_from_keep(arch, {"b": [0, 2, 5], "blk0.inner": [1]})
  small_arch, small = masks_lib.materialize(arch, variables, masks)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  _assert_close_rel(
      cnn.apply_model(arch, masks_lib.mask_variables(arch, variables, masks), x, masks=masks),
      cnn.apply_model(small_arch, small, x), 1e-5)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def _resnet20_state_dict():
  arch = zoo.get_arch("resnet20", 10)
  return reference.export_reference_state_dict(arch, _random_variables(arch, 0))


def test_unknown_architecture_names():
  with pytest.raises(ValueError, match="resnet999"):
    zoo.get_arch("resnet999", 10)
  with pytest.raises(ValueError, match="densenet"):
    reference.import_reference_model(_resnet20_state_dict(), "densenet", 10)


def test_state_dict_missing_key():
  sd = _resnet20_state_dict()
  del sd["layer2.1.bn1.running_var"]
  with pytest.raises(ValueError, match=r"layer2\.1\.bn1\.running_var"):
    reference.import_reference_model(sd, "resnet20", 10)


def test_state_dict_extra_key():
  sd = _resnet20_state_dict()
  sd["layer1.0.conv3.weight"] = np.zeros((16, 16, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"layer1\.0\.conv3\.weight"):
    reference.import_reference_model(sd, "resnet20", 10)


def test_state_dict_wrong_shape():
  sd = _resnet20_state_dict()
  sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"].transpose(1, 0, 2, 3)  # [16,32]
  with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight"):
    reference.import_reference_model(sd, "resnet20", 10)
  sd = _resnet20_state_dict()
  sd["layer2.0.downsample.0.weight"] = np.zeros((32, 16, 3, 3), np.float32)  # 1x1 expected
  with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.0\.weight"):
    reference.import_reference_model(sd, "resnet20", 10)
  sd = _resnet20_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:, :, None]
  with pytest.raises(ValueError, match=r"fc\.weight"):
    reference.import_reference_model(sd, "resnet20", 10)
  sd = _resnet20_state_dict()
  sd["fc.bias"] = sd["fc.bias"][:-1]
  with pytest.raises(ValueError, match=r"fc\.bias"):
    reference.import_reference_model(sd, "resnet20", 10)


def test_state_dict_unequal_residual_widths():
  sd = _resnet20_state_dict()
  sd["layer1.1.conv2.weight"] = sd["layer1.1.conv2.weight"][:-1]
  for leaf in ("weight", "bias", "running_mean", "running_var"):
    sd[f"layer1.1.bn2.{leaf}"] = sd[f"layer1.1.bn2.{leaf}"][:-1]
  with pytest.raises(ValueError, match=r"layer1\.1\.(conv2|bn2)"):
    reference.import_reference_model(sd, "resnet20", 10)
  with pytest.raises(ValueError, match="num_classes"):
    reference.import_reference_model(_resnet20_state_dict(), "resnet20", 100)


def test_from_graph_of_other_architecture_or_widths():
  arch = _ARCHS["resnet_tiny"]
  graph = graph_lib.to_graph(arch, _random_variables(arch, 0))
  other = zoo.get_arch("resnet20", 10, width_mult=0.5)
  with pytest.raises(ValueError, match="resnet20"):
    graph_lib.from_graph(other, graph)
  narrower = arch.with_widths({"layer1.0.conv1": arch.width("layer1.0.conv1") - 1})
  with pytest.raises(ValueError, match="widths"):
    graph_lib.from_graph(narrower, graph)
  multi = _ARCHS["resnet50"]
  with pytest.raises(ValueError, match="edge kinds"):
    graph_lib.from_graph(multi, graph)


def test_variables_that_do_not_fit():
  arch = _ARCHS["resnet_tiny"]
  variables = _random_variables(arch, 0)
  bad = jax.tree_util.tree_map(lambda a: a, variables)
  bad["params"]["layer2_0_conv2"]["kernel"] = bad["params"]["layer2_0_conv2"]["kernel"][..., :-1]
  with pytest.raises(ValueError, match="layer2_0_conv2"):
    graph_lib.to_graph(arch, bad)
  del bad["batch_stats"]["bn1"]
  with pytest.raises(ValueError, match="bn1"):
    graph_lib.to_graph(arch, bad)


def test_with_widths_and_masks_errors():
  arch = _ARCHS["resnet_tiny"]
  with pytest.raises(ValueError, match="nonexistent"):
    arch.with_widths({"nonexistent": 3})
  with pytest.raises(ValueError, match="classes"):
    arch.with_widths({"classes": 3})
  with pytest.raises(ValueError, match="s1"):
    arch.with_widths({"s1": 0})
  variables = _random_variables(arch, 0)
  with pytest.raises(ValueError, match="s2"):
    masks_lib.materialize(arch, variables, {"s2": jnp.ones(arch.width("s2") + 1)})
  with pytest.raises(ValueError, match="s2"):
    masks_lib.materialize(arch, variables, {"s2": jnp.zeros(arch.width("s2"))})
  with pytest.raises(ValueError, match="nonexistent"):
    masks_lib.materialize(arch, variables, {"nonexistent": jnp.ones(2)})


def test_residual_add_of_unequal_spaces_is_rejected():
  b = arch_lib.Builder()
  b.space(arch_lib.INPUT, 3)
  s, t = b.space("s", 4), b.space("t", 4)
  x = b.conv("x", "c1", arch_lib.INPUT, s, 3)
  y = b.conv(x, "c2", s, t, 3)
  b.add(y, x)
  with pytest.raises(ValueError, match="residual"):
    b.build(name="bad", ref_name="bad", num_classes=4)


# ---------------------------------------------------------------------------------------------
# jit == eager
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet_tiny", "resnet50"])
@pytest.mark.parametrize("normalizer", ["max", "mean", "none"])
def test_group_importance_jit_equals_eager(name, normalizer):
  arch = _ARCHS[name]
  variables = _random_variables(arch, 4)
  eager = groups_lib.group_importance(arch, variables, normalizer)
  jitted = jax.jit(groups_lib.group_importance, static_argnums=(0, 2))(arch, variables,
                                                                        normalizer)
  assert len(eager) == len(jitted) == len(groups_lib.pruning_groups(arch))
  for e, j in zip(eager, jitted):
    _assert_close_rel(j, e, 1e-6)


def test_graph_from_flat_jit_equals_eager():
  arch = _ARCHS["vgg19"]
  layout = graph_lib.graph_layout(arch)
  flat = graph_lib.flatten_variables(arch, _random_variables(arch, 5))
  eager = graph_lib.graph_from_flat(layout.arrays(), flat)
  jitted = jax.jit(graph_lib.graph_from_flat)(layout.arrays(), flat)
  _assert_trees_equal(jitted, eager)


@pytest.mark.parametrize("name", ["resnet_tiny", "vgg19", "resnet50"])
def test_to_graph_equals_layout_gather(name):
  """``to_graph`` (reshapes/transposes) and the layout's gathers (padding path) agree."""
  arch = _ARCHS[name]
  variables = _random_variables(arch, 6)
  layout = graph_lib.graph_layout(arch)
  gathered = graph_lib.graph_from_flat(layout.arrays(),
                                       graph_lib.flatten_variables(arch, variables))
  direct = graph_lib.to_graph(arch, variables)
  _assert_trees_equal(direct._replace(n_node=None, n_edge=None),
                      gathered._replace(n_node=None, n_edge=None))
  np.testing.assert_array_equal(direct.n_node, gathered.n_node)
  np.testing.assert_array_equal(direct.n_edge, gathered.n_edge)


@pytest.mark.parametrize("kernel,stride,pad,size", [(3, 1, 1, 8), (3, 2, 1, 8), (3, 2, 1, 9),
                                                    (1, 2, 0, 8), (7, 2, 3, 11), (3, 1, 0, 7)])
def test_conv2d_backward_equals_xla(kernel, stride, pad, size):
  """cnn.conv2d's hand-written VJP is XLA's own, bit for bit, outside and inside a scan (its
  undifferentiated forward may run the narrow-conv CPU kernel: equal up to rounding)."""
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(kernel * 100 + size), 3)
  x = jax.random.normal(kx, (3, size, size, 4))
  w = jax.random.normal(kw, (kernel, kernel, 4, 5))
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dy = jax.random.normal(kd, lax_conv(x, w).shape)
  want = jax.jit(lambda x, w, dy: jax.vjp(lax_conv, x, w)[1](dy))(x, w, dy)
  ours = jax.jit(lambda x, w, dy: jax.vjp(
      lambda x, w: cnn.conv2d(x, w, strides, padding), x, w)[1](dy))(x, w, dy)
  np.testing.assert_allclose(cnn.conv2d(x, w, strides, padding), lax_conv(x, w), rtol=1e-5,
                             atol=1e-5)
  for a, b in zip(ours, want):
    np.testing.assert_array_equal(a, b)

  def scanned(x, w, dy):  # two steps of a loop: the context XLA used to mishandle
    def body(c, _):
      gx, gw = jax.vjp(lambda x, w: cnn.conv2d(x, w, strides, padding), x, w)[1](dy)
      return (c[0] + gx, c[1] + gw), None
    return jax.lax.scan(body, (jnp.zeros_like(x), jnp.zeros_like(w)), None, length=2)[0]
  for a, b in zip(jax.jit(scanned)(x, w, dy), want):
    np.testing.assert_allclose(a, 2 * b, rtol=1e-6, atol=1e-5)


def test_conv_compiler_options_take_convolutions_off_ynnpack(monkeypatch):
  """The options move convolutions (only) off YNNPACK, the result unchanged; XLA_FLAGS wins."""
  if jax.default_backend() != "cpu":
    pytest.skip("the options are CPU-only")
  opts = xla_hints.conv_compiler_options()
  assert opts, "the pinned XLA should accept the YNNPACK fusion-type option"
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 64))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64))

  def net(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, jnp.sum(y, axis=(0, 1, 2))

  def hlo(**kw):
    return jax.jit(net, **kw).lower(x, w).compile().as_text()

  def ynn_ops(text):  # HLO op kinds computed inside YNNPACK fusions
    comps = dict(re.findall(r"^(%\S+) \(.*?\n(.*?)\n}", text, re.M | re.S))
    called = re.findall(r"= \S+ fusion\(.*calls=(%[^,\s]+).*__ynn_fusion", text)
    return {op for c in called for op in re.findall(r"= \S+ ([a-z-]+)\(", comps[c])}

  prev = jax.config.read("jax_disable_most_optimizations")  # conftest turns the passes off
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    default, ours = hlo(), hlo(compiler_options=opts)
    np.testing.assert_allclose(jax.jit(net, compiler_options=opts)(x, w)[0],
                               jax.jit(net)(x, w)[0], rtol=1e-5, atol=1e-4)
  finally:
    jax.config.update("jax_disable_most_optimizations", prev)
  assert "convolution" in ynn_ops(default) and "reduce" in ynn_ops(default), \
      "XLA:CPU's YNNPACK defaults changed: revisit xla_hints._YNN_NO_CONV"
  assert "convolution" not in ynn_ops(ours) and "reduce" in ynn_ops(ours)
  assert "convolution(" in ours
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_hints.conv_compiler_options() == {}
