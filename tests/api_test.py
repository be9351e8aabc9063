"""The package's public API: what `import metaprune_jax` loads, and every public name."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every public name `metaprune_jax.<name>` gave before the API was curated (issue 26): functions,
# classes and submodules. External code and checks use them; none may go away.
PUBLIC_NAMES = (
  "Arch", "CheckpointError", "FitResult", "Group", "Layer", "Member", "MetaNet", "Op",
  "PruneResult", "TrainState", "adaptive_prune", "apply_metanet", "apply_model", "arch",
  "checkpoint", "cnn", "count_macs", "cpu_kernels", "data", "datamodels",
  "default_metanet_config", "embed", "evaluate", "export_reference_metanet",
  "export_reference_state_dict", "fit", "from_graph", "full_masks", "get_arch", "get_dataset",
  "graph", "graph_from_reference_arrays", "graph_layout", "graph_to_reference_arrays",
  "group_importance", "groups", "host_memory", "import_reference_metanet",
  "import_reference_model", "init_metanet", "init_variables", "load_metanet", "load_pruned",
  "load_run", "macs", "make_metanet_config", "mask_variables", "masks", "materialize",
  "meta_modes", "meta_train_grads", "metanet", "metanet_blocks", "metanet_epochs", "metatrain",
  "metric_writers", "modes", "optim", "pad_graph", "pipeline", "progressive_prune", "prune_mode",
  "prune_to_target", "pruning", "pruning_groups", "pruning_trajectory", "reference",
  "regularizer", "scramble_classifier", "sharding", "state", "steps", "to_graph", "train",
  "transform", "unpad_graph", "validate_graph", "xla_hints", "zoo",
)

# Loaded by the run modes only, never by `import metaprune_jax`.
HEAVY = ("orbax", "grain", "tensorboardX", "tqdm", "matplotlib")


def _python(code: str) -> str:
  """Runs `code` in a fresh interpreter (nothing imported yet) and returns its stdout."""
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=_ROOT,
                       capture_output=True, text=True, timeout=120)
  if out.returncode:
    raise AssertionError(out.stderr)
  return out.stdout.strip()


class ApiTest(absltest.TestCase):

  def test_import_loads_only_the_functional_api(self):
    loaded = _python(f"""
        import sys
        import metaprune_jax
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """)
    self.assertEqual(loaded, "[]")

  def test_runtime_loads_on_first_use(self):
    out = _python(f"""
        import sys
        import metaprune_jax as mp
        mp.load_run  # the training runtime: Orbax, Grain, tensorboardX, tqdm
        from metaprune_jax.runtime import train
        print(mp.load_run is train.load_run, sorted(m for m in {HEAVY!r} if m in sys.modules))
        """)
    self.assertEqual(out, "True ['grain', 'orbax', 'tensorboardX', 'tqdm']")

  def test_every_public_name_is_still_there(self):
    out = _python(f"""
        import types
        import metaprune_jax as mp
        missing = [n for n in {PUBLIC_NAMES!r} if not hasattr(mp, n)]
        undeclared = [n for n in mp.__all__ if not hasattr(mp, n)]
        listed = [n for n in {PUBLIC_NAMES!r} if n not in dir(mp)]
        print(missing, undeclared, listed, isinstance(mp.masks, types.ModuleType),
              callable(mp.regularizer), mp.__version__)
        """)
    self.assertEqual(out, "[] [] [] True True 0.2.0")

  def test_all_declares_the_functions_and_classes(self):
    import metaprune_jax as mp  # pylint: disable=g-import-not-at-top
    self.assertEqual(len(mp.__all__), len(set(mp.__all__)))
    for name in ("to_graph", "prune_to_target", "transform", "import_reference_model",
                 "load_run", "fit", "get_arch", "count_macs"):
      self.assertIn(name, mp.__all__)
    with self.assertRaises(AttributeError):
      mp.no_such_name  # pylint: disable=pointless-statement

  def test_flat_module_names_import_as_the_modules_at_their_new_place(self):
    out = _python("""
        import importlib
        import metaprune_jax as mp
        wrong = []
        for old, new in sorted(mp._MOVED.items()):  # pylint: disable=protected-access
          module = importlib.import_module(f"metaprune_jax.{new}")
          via_import = importlib.import_module(f"metaprune_jax.{old}")  # import metaprune_jax.x
          via_from = getattr(__import__("metaprune_jax", fromlist=[old]), old)  # from .. import
          if not (via_import is module and via_from is module and getattr(mp, old) is module
                  and module.__name__ == f"metaprune_jax.{new}"
                  and module.__spec__.name == f"metaprune_jax.{new}"):
            wrong.append(old)
        import metaprune_jax.graph as g
        from metaprune_jax.train import fit
        import metaprune_jax.regularizer  # the module; mp.regularizer stays the function
        from metaprune_jax.regularizer import regularizer
        print(wrong, g.to_graph is mp.to_graph, fit is mp.fit, len(mp._MOVED),
              regularizer is mp.regularizer, callable(mp.regularizer))
        """)
    self.assertEqual(out, "[] True True 33 True True")

  def test_import_does_not_patch_jax(self):
    out = _python("""
        import jax
        before = {n: hasattr(jax, n) for n in ("tree_map", "tree_leaves", "tree_flatten",
                                               "tree_unflatten", "tree_structure")}
        import metaprune_jax
        metaprune_jax.to_graph, metaprune_jax.fit  # the functional API and the runtime
        after = {n: hasattr(jax, n) for n in before}
        print(before == after)
        """)
    self.assertEqual(out, "True")


if __name__ == "__main__":
  absltest.main()
