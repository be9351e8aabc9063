"""Tests of the metanetwork (metaprune_jax/metanetwork/metanet.py) against the reference fixtures."""

import functools
import json
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import jraph
import numpy as np

import _fixtures
import _xla_env

from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import blocks as metanet_blocks
from metaprune_jax.metanetwork import metanet
from metaprune_jax.nets import cnn
from metaprune_jax.nets import reference
from metaprune_jax.nets import zoo
from metaprune_jax.prune import masks as mp_masks

_FIXTURES = str(_fixtures.path())  # $METAPRUNE_REFERENCE_FIXTURES (tests/_fixtures.py)
# case -> (residual ratio of the fixture's metanetwork, reference model name)
_CASES = {
    "resnet56_c10_pruned": (0.01, "resnet56"),
    "vgg19_c100_small": (0.05, "VGG19"),
    "resnet50_imagenet_pruned": (0.0005, "resnet50"),
}


def _load(case, name):
  return np.load(os.path.join(_FIXTURES, case, name + ".npz"))


@functools.lru_cache(maxsize=None)
def _fixture(case):
  """(config, params, reference graph, expected nodes, expected edges) of a case."""
  ratio = _CASES[case][0]
  config, params = metanet.import_reference_metanet(dict(_load(case, "metanet")), ratio, ratio)
  g, out = _load(case, "graph"), _load(case, "metanet_out")
  if "edge_features" in g.files:
    edges, expected = (g["edge_features"],), (out["edge_pred"],)
  else:
    edges = tuple(g[f"edge_features_{d}"] for d in (49, 9, 1))
    expected = tuple(out[f"edge_pred_{d}"] for d in (49, 9, 1))
  ei = g["edge_index"].astype(np.int32)
  n = g["node_features"].shape[0]
  graph = jraph.GraphsTuple(nodes=g["node_features"], edges=edges, senders=ei[0],
                            receivers=ei[1], n_node=np.array([n], np.int32),
                            n_edge=np.array([ei.shape[1]], np.int32), globals=None)
  return config, params, graph, out["node_pred"], expected


def _rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _tiny(widths=None, seed=0):
  arch = zoo.get_arch("resnet_tiny", 10)
  if widths:
    arch = arch.with_widths(widths)
  return arch, cnn.init_variables(arch, jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def _tiny_graph():
  arch, variables = _tiny()
  return arch, variables, jax.tree_util.tree_map(np.asarray, graph_lib.to_graph(arch, variables))


def _drop_nodes(graph, drop):
  """A smaller graph: ``graph`` without the nodes ``drop`` and their edges (numpy)."""
  n = graph.nodes.shape[0]
  keep = np.setdiff1d(np.arange(n), drop)
  new_id = np.full((n,), -1, np.int64)
  new_id[keep] = np.arange(keep.size)
  alive = (new_id[graph.senders] >= 0) & (new_id[graph.receivers] >= 0)
  return graph._replace(
      nodes=graph.nodes[keep], edges=(graph.edges[0][alive],),
      senders=new_id[graph.senders[alive]].astype(np.int32),
      receivers=new_id[graph.receivers[alive]].astype(np.int32),
      n_node=np.array([keep.size], np.int32), n_edge=np.array([alive.sum()], np.int32))


def _allclose(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


class FixtureTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    message = _fixtures.missing()  # as tests/conftest.py does for the other fixture tests
    if message is not None:
      self.skipTest(message)

  @parameterized.parameters(*_CASES)
  def test_matches_reference_outputs(self, case):
    config, params, graph, want_nodes, want_edges = _fixture(case)
    out = metanet.apply_metanet(config, params, graph)
    self.assertLessEqual(_rel(out.nodes, want_nodes), 1e-5)
    self.assertLen(out.edges, len(want_edges))
    for got, want in zip(out.edges, want_edges):
      self.assertLessEqual(_rel(got, want), 1e-5)
    np.testing.assert_array_equal(out.senders, graph.senders)

  @parameterized.parameters(*_CASES)
  def test_export_import_roundtrip(self, case):
    sd = dict(_load(case, "metanet"))
    config, params = metanet.import_reference_metanet(sd, 0.01, 0.01)
    exported = metanet.export_reference_metanet(config, params)
    self.assertEqual(list(exported), list(sd))
    for k, v in sd.items():
      self.assertEqual(exported[k].shape, v.shape, k)
      if not k.startswith("mlps."):
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    _, params2 = metanet.import_reference_metanet(exported, 0.01, 0.01)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)

  def test_default_configs_fit_fixtures(self):
    for case, task in (("resnet56_c10_pruned", "resnet56"), ("vgg19_c100_small", "vgg19"),
                       ("resnet50_imagenet_pruned", "resnet50")):
      config = _fixture(case)[0]
      default = metanet.default_metanet_config(task)
      for field in ("num_layers", "hidden", "node_dim", "edge_dims"):
        self.assertEqual(config[field], default[field], (case, field))

  @parameterized.parameters(
      "resnet56_c10_pruned", "vgg19_c100_small",
      # ~35 s on 2 cores (1.2M-edge graph conversions): opt in with METAPRUNE_SLOW_TESTS=1.
      *(["resnet50_imagenet_pruned"] if os.environ.get("METAPRUNE_SLOW_TESTS") else []))
  def test_transform_matches_reference_logits(self, case):
    config, params = _fixture(case)[:2]
    meta = json.load(open(os.path.join(_FIXTURES, case, "meta.json")))
    arch, variables = reference.import_reference_model(
        dict(_load(case, "model")), _CASES[case][1], meta["num_classes"])
    new = metanet.transform(config, params, arch, variables, reference_compat=True)
    x = jnp.transpose(_load(case, "io")["x"], (0, 2, 3, 1))
    logits = cnn.apply_model(arch, new, x)
    self.assertLessEqual(_rel(logits, _load(case, "metanet_out")["logits_after_metanet"]), 1e-3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["batch_stats"],
                           variables["batch_stats"])


class PropertiesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.config = metanet.default_metanet_config("digits")
    self.params = metanet.init_metanet(self.config, jax.random.PRNGKey(1))

  def test_padding_invariance(self):
    _, _, graph = _tiny_graph()
    out = metanet.apply_metanet(self.config, self.params, graph)
    n, e = graph.nodes.shape[0], graph.edges[0].shape[0]
    padded = metanet.pad_graph(graph, n + 37, (e + 1000,))
    self.assertEqual(padded.n_node.tolist(), [n, 37])
    out_pad = metanet.apply_metanet(self.config, self.params, padded)
    cut = metanet.unpad_graph(out_pad, graph)
    _allclose(cut.nodes, out.nodes)
    _allclose(cut.edges[0], out.edges[0])

  def test_one_compilation_per_budget(self):
    _, _, full = _tiny_graph()
    budget_nodes, budget_edges = full.nodes.shape[0] + 1, (full.edges[0].shape[0],)
    # Differently pruned networks: hidden channels removed from different node sets.
    graphs = [_drop_nodes(full, d) for d in (np.arange(3, 7), np.arange(20, 40),
                                             np.array([12, 50, 51, 52, 70]))]
    outs = [metanet.apply_metanet(self.config, self.params, graphs[0])]  # unpadded: own shape
    # private: counts compilations of the jitted core, which the public apply_metanet hides
    before = metanet._forward_jit._cache_size()
    for g in graphs:
      padded = metanet.pad_graph(g, budget_nodes, budget_edges)
      out = metanet.unpad_graph(metanet.apply_metanet(self.config, self.params, padded), g)
      outs.append(out)
    self.assertEqual(metanet._forward_jit._cache_size() - before, 1)
    _allclose(outs[1].nodes, outs[0].nodes)
    _allclose(outs[1].edges[0], outs[0].edges[0])

  def test_equivariance_to_hidden_channel_permutations(self):
    arch, _, graph = _tiny_graph()
    layout = graph_lib.graph_layout(arch)
    perm = np.arange(graph.nodes.shape[0])  # old node id -> new node id
    rng = np.random.default_rng(0)
    for _, space, start, count in layout.node_sets:
      if space not in ("input", "classes"):
        perm[start:start + count] = start + rng.permutation(count)
    nodes = np.empty_like(graph.nodes)
    nodes[perm] = graph.nodes
    permuted = graph._replace(nodes=nodes, senders=perm[graph.senders].astype(np.int32),
                              receivers=perm[graph.receivers].astype(np.int32))
    out = metanet.apply_metanet(self.config, self.params, graph)
    out_p = metanet.apply_metanet(self.config, self.params, permuted)
    _allclose(np.asarray(out_p.nodes)[perm], out.nodes)
    _allclose(out_p.edges[0], out.edges[0])

  def test_fresh_init_is_near_identity(self):
    _, _, graph = _tiny_graph()
    deltas = {}
    for ratio in (0.01, 0.001):
      config = metanet.make_metanet_config(2, 16, 8, (9,), ratio, ratio)
      out = metanet.apply_metanet(config, self.params, graph)
      deltas[ratio] = (np.asarray(out.nodes) - graph.nodes, np.asarray(out.edges[0]) -
                       graph.edges[0])
      # Decoder outputs of a fresh net are O(1): the change is bounded by ratio times that.
      for d in deltas[ratio]:
        self.assertLess(np.abs(d).max(), 10 * ratio)
    for a, b in zip(deltas[0.01], deltas[0.001]):
      np.testing.assert_allclose(a / 0.01, b / 0.001, atol=1e-2)

  def test_transform_gradient_is_finite(self):
    arch, variables = _tiny({"s2": 9, "layer2.0.conv1": 7})
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))

    def loss(params):
      new = metanet.transform(self.config, params, arch, variables)
      return jnp.mean(cnn.apply_model(arch, new, x) ** 2)

    grads = jax.jit(jax.grad(loss))(self.params)
    leaves = jax.tree_util.tree_leaves(grads)
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(g))) for g in leaves))
    self.assertGreater(sum(float(jnp.abs(g).sum()) for g in leaves), 0.0)
    exported = metanet.export_reference_metanet(self.config, grads)
    self.assertIn("convs.1.downlin.weight", exported)

  def test_transform_keeps_shapes_and_running_stats(self):
    arch, variables = _tiny({"s2": 9, "layer2.0.conv1": 7})
    new = metanet.transform(self.config, self.params, arch, variables)
    jax.tree_util.tree_map(lambda a, b: self.assertEqual(a.shape, b.shape), new["params"],
                           variables["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["batch_stats"],
                           variables["batch_stats"])


def _assert_block_grad_equals_scatter(config, params, graph, plan):
  """Gradient w.r.t. the metanetwork params: dense-block path (``plan``) == scatter path."""
  # private: _forward is the un-jitted core both paths share (apply_metanet adds jit and input
  # checks around it); it takes the hashable spec _spec builds from the config
  spec = metanet._spec(config)

  def loss(p, plan):
    out = metanet._forward(spec, p, graph, plan)
    return sum(jnp.sum(jnp.sin(3.0 * x)) for x in (out.nodes, *out.edges))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  for a, b in zip(jax.tree_util.tree_leaves(grad(params, plan)),
                  jax.tree_util.tree_leaves(grad(params, None))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


class BlockPathTest(parameterized.TestCase):
  """The dense-block fast path (metanet_blocks) against the generic scatter path."""

  @parameterized.parameters("resnet_tiny", "bottleneck")
  def test_block_path_equals_scatter_path(self, name):
    if name == "bottleneck":
      # multi-kind graph (49/9/1 kinds): projection shortcuts and, in the second block of
      # stage 2, diagonal reversed identities; two stages keep the compilation short
      arch = zoo.bottleneck_resnet((1, 2), 10, "bottleneck12", "bottleneck12", width_mult=0.0625)
      config = metanet.make_metanet_config(2, 8, 8, graph_lib.edge_kinds(arch), 0.1, 0.1)
    else:
      arch = zoo.get_arch(name, 10)
      config = metanet.make_metanet_config(2, 16, 8, (9,), 0.1, 0.1)
    variables = cnn.init_variables(arch, jax.random.PRNGKey(0))
    graph = graph_lib.to_graph(arch, variables)
    params = metanet.init_metanet(config, jax.random.PRNGKey(1))
    plan = metanet.block_plan(arch)
    want = metanet.apply_metanet(config, params, graph)
    got = metanet.apply_metanet(config, params, graph, plan=plan)
    _allclose(got.nodes, want.nodes)
    for a, b in zip(got.edges, want.edges):
      _allclose(a, b)
    _assert_block_grad_equals_scatter(config, params, graph, plan)

  def test_block_path_gradient_with_tied_messages(self):
    # Constant kernels and fresh BatchNorms make many messages of a node exactly equal, so the
    # max/min gradients are split among ties (the block path packs the max and min tie counts
    # into one reduction). Gradients must match the scatter path's (which splits them the
    # same way); with tie counts forced to 1 this test fails.
    arch = zoo.get_arch("resnet_tiny", 10)
    config = metanet.make_metanet_config(2, 16, 8, (9,), 0.1, 0.1)
    variables = cnn.init_variables(arch, jax.random.PRNGKey(0))
    params_v = dict(variables["params"])
    for name in list(params_v)[:4]:
      leaf = dict(params_v[name])
      if "kernel" in leaf:
        leaf["kernel"] = jnp.full_like(leaf["kernel"], 0.25)
        params_v[name] = leaf
    variables = {"params": params_v, "batch_stats": variables["batch_stats"]}
    graph = graph_lib.to_graph(arch, variables)
    edges = np.asarray(graph.edges[0])
    self.assertGreater(edges.shape[0] - np.unique(edges, axis=0).shape[0], 100)  # many ties
    params = metanet.init_metanet(config, jax.random.PRNGKey(1))
    _assert_block_grad_equals_scatter(config, params, graph, metanet.block_plan(arch))

  def test_chunked_block_loop_equals_whole_groups(self):
    # metanet_blocks._map_blocks runs a group's blocks a chunk at a time (cache-sized steps);
    # the results must not depend on it: forward and gradient, with and without node masks.
    arch = zoo.get_arch("resnet20", 10)
    config = metanet.make_metanet_config(2, 8, 8, (9,), 0.1, 0.1)
    spec = metanet._spec(config)  # private: metanet_blocks.forward takes the hashable spec
    variables = cnn.init_variables(arch, jax.random.PRNGKey(0))
    graph = graph_lib.to_graph(arch, variables)
    params = metanet.init_metanet(config, jax.random.PRNGKey(1))
    plan = metanet.block_plan(arch)
    rng = np.random.default_rng(0)
    valid = graph_lib.node_valid(arch, {s: (rng.random(arch.width(s)) < 0.6).astype(np.float32)
                                        for s in arch.prunable_spaces})

    def run(chunk_bytes, node_valid):
      def loss(p):
        out = metanet_blocks.forward(spec, p, graph.nodes, graph.edges, plan, node_valid,
                                     graph.senders, graph.receivers, grid_impl="xla")
        return sum(jnp.sum(jnp.sin(3.0 * x)) for x in (out[0], *out[1])), out
      with mock.patch.object(metanet_blocks, "_CHUNK_BYTES", chunk_bytes):
        # 9 blocks of 16x16 (hidden 8: 8 KiB each): chunks of 3 under a 24 KiB budget
        # private: the chunk size is internal; the test checks the patched budget took effect
        self.assertEqual(metanet_blocks._block_chunk((9, 16, 16, 8)),
                         3 if chunk_bytes < 2**20 else 9)
        # XLA's default emitters, as the library runs: bit for bit there (see _xla_env)
        return jax.jit(jax.grad(loss, has_aux=True),
                       compiler_options=_xla_env.LIBRARY_EMITTERS)(params)

    for node_valid in (None, valid):
      whole, chunked = run(2**30, node_valid), run(24 * 2**10, node_valid)
      for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_array_equal(a, b)

  def test_masked_block_path_equals_pruned_graph(self):
    full, variables = _tiny()
    keep = {"s2": np.array([0, 3, 4, 9, 15]), "layer2.0.conv1": np.array([1, 2, 7])}
    masks = mp_masks.masks_from_keep(full, keep)
    small, small_vars = mp_masks.materialize(full, variables, masks)
    config = metanet.default_metanet_config("digits")
    params = metanet.init_metanet(config, jax.random.PRNGKey(1))
    want = metanet.apply_metanet(config, params, graph_lib.to_graph(small, small_vars))
    embedded, _ = mp_masks.embed(full, small_vars, mp_masks.kept_indices(full, masks))
    graph = graph_lib.to_graph(full, embedded)
    valid = graph_lib.node_valid(full, masks)
    # private: the node-validity mask (the masked, embedded form meta-training uses) is an
    # argument of the core _forward only; apply_metanet has no such argument
    out = jax.jit(metanet._forward, static_argnums=(0, 3))(
        metanet._spec(config), params, graph, metanet.block_plan(full), valid)
    # the pruned network's nodes and edges, in the full graph's order
    ids = np.flatnonzero(np.asarray(valid))
    _allclose(np.asarray(out.nodes)[ids], want.nodes)
    snd, rcv = np.asarray(graph.senders), np.asarray(graph.receivers)
    alive = np.asarray(valid)[snd] * np.asarray(valid)[rcv] > 0
    _allclose(np.asarray(out.edges[0])[alive], want.edges[0])
    np.testing.assert_array_equal(np.asarray(out.edges[0])[~alive], 0.0)
    np.testing.assert_array_equal(np.asarray(out.nodes)[np.asarray(valid) == 0], 0.0)


class BadInputTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.config = metanet.default_metanet_config("digits")
    self.params = metanet.init_metanet(self.config, jax.random.PRNGKey(0))
    self.arch, self.variables, self.graph = _tiny_graph()

  def test_checkpoint_shape_mismatch(self):
    sd = dict(metanet.export_reference_metanet(self.config, self.params))
    sd["convs.1.lin3.0.weight"] = np.zeros((16, 15), np.float32)
    with self.assertRaisesRegex(ValueError, r"convs\.1\.lin3\.0\.weight.*\(16, 16\)"):
      metanet.import_reference_metanet(sd, 0.01, 0.01)
    sd = dict(metanet.export_reference_metanet(self.config, self.params))
    del sd["nodeDec.3.bias"]
    with self.assertRaisesRegex(ValueError, "nodeDec.3.bias"):
      metanet.import_reference_metanet(sd, 0.01, 0.01)

  def test_unknown_edge_kind(self):
    graph = self.graph._replace(edges=(np.zeros((self.graph.edges[0].shape[0], 7), np.float32),))
    with self.assertRaisesRegex(ValueError, "no encoder"):
      metanet.apply_metanet(self.config, self.params, graph)
    config = metanet.make_metanet_config(1, 4, 8, (49, 9, 1), 0.01, 0.01)
    with self.assertRaisesRegex(ValueError, "edge kinds"):
      metanet.apply_metanet(config, self.params, self.graph)

  def test_non_finite_input(self):
    nodes = np.array(self.graph.nodes)
    nodes[5, 1] = np.nan
    with self.assertRaisesRegex(ValueError, "NaN/Inf"):
      metanet.apply_metanet(self.config, self.params, self.graph._replace(nodes=nodes))
    variables = jax.tree_util.tree_map(np.array, self.variables)
    name = self.arch.classifier
    variables["params"][name]["kernel"][0, 0] = np.inf
    with self.assertRaises(ValueError):
      metanet.transform(self.config, self.params, self.arch, variables)

  def test_unknown_task(self):
    with self.assertRaisesRegex(ValueError, "resnet56"):
      metanet.default_metanet_config("alexnet")


if __name__ == "__main__":
  absltest.main()
