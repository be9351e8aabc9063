"""Every benchmark script's imports resolve: a name moved in the package or between benchmark
scripts breaks a benchmark that no other test runs (the scripts are run by hand or by the device
check). Checked from the source (no script is executed): ``from <sibling> import name`` needs the
sibling to define ``name`` at its top level, ``from metaprune_jax... import name`` needs the
module to have it."""

import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(glob.glob(os.path.join(BENCH, "*.py")))


def _top_level_names(path):
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for t in targets:
        for n in ast.walk(t):
          if isinstance(n, ast.Name):
            names.add(n.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
  return names


def test_there_are_benchmarks():
  assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.basename(p) for p in SCRIPTS])
def test_benchmark_imports_resolve(path):
  siblings = {os.path.basename(p)[:-3]: p for p in SCRIPTS}
  tree = ast.parse(open(path).read(), path)
  missing = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        top = a.name.split(".")[0]
        if top == "metaprune_jax":
          importlib.import_module(a.name)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module in siblings:
        have = _top_level_names(siblings[node.module])
        missing += [f"{node.module}.{a.name}" for a in node.names if a.name not in have]
      elif node.module.split(".")[0] == "metaprune_jax":
        mod = importlib.import_module(node.module)
        for a in node.names:
          if not hasattr(mod, a.name):
            try:
              importlib.import_module(f"{node.module}.{a.name}")
            except ImportError:
              missing.append(f"{node.module}.{a.name}")
  assert not missing, f"{os.path.basename(path)} imports names that do not exist: {missing}"
