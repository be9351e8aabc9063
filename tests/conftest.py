"""Shared pytest fixtures: the reference-fixture folder and fast CPU compilation."""

import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from metaprune_jax.backends import host_memory

import _fixtures
import _xla_env

# Transparent huge pages for every process this run starts (the xdist workers, which the
# controller starts after loading this file, and their CLI runs and workers): the same setting
# `python -m metaprune_jax` restarts itself with (metaprune_jax/backends/host_memory.py). The process that
# loads this file first keeps its own allocator; it only collects and reports.
host_memory.set_for_subprocesses()

# XLA:CPU's faster-compiling loop emitters for every process of the run (see _xla_env).
_xla_env.set_for_this_run()

# Tests compile many small programs once each; XLA's optimisation passes cost far more than
# they save here. Numerics stay within the tolerances the tests compare at (<= 1e-4 relative).
jax.config.update("jax_disable_most_optimizations", True)
# The same for the CLI runs and workers the tests start as subprocesses (they inherit the
# environment): a tiny meta_train run compiles in 9 s instead of 20 s.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

# A persistent compilation cache shared by this test run's processes (both xdist workers and
# every CLI run or worker they start inherit the folder through the environment): the resume
# tests restart the same command, and the restarted process loads its programs instead of
# compiling them again (the 2-process meta_train resume test: 178 s -> 78 s). The folder is
# made fresh by the first process of the run (the xdist controller) and removed by it at the end.
if "METAPRUNE_JAX_TEST_XLA_CACHE" not in os.environ:
  os.environ["METAPRUNE_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="metaprune_jax_xla_cache_")
  _OWNS_CACHE = True
else:
  _OWNS_CACHE = False
_CACHE_DIR = os.environ["METAPRUNE_JAX_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
# Every program, however small: a CLI run compiles ~130 small eager ones (~4 s) besides its
# steps, and a warm tiny meta_train run takes 14.7 s with them cached against 17.4 s without
# (2.3 MB of cache).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session", name="FIXTURES")
def fixtures_path() -> pathlib.Path:
  """The reference-fixture folder (``$METAPRUNE_REFERENCE_FIXTURES``, see ``_fixtures``).

  Skips the test when it is missing.
  """
  return _fixtures.require()

