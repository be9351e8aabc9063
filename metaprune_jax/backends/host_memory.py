"""Transparent huge pages for XLA:CPU's buffers (glibc ``malloc``): restart with the tunable.

Why. XLA:CPU allocates the outputs and temporaries of every jitted call with ``malloc`` and
frees them when the call ends. glibc serves large requests with a fresh ``mmap`` and gives them
back with ``munmap``, so every call faults its buffers in again, one 4 KiB page at a time. On a
virtual machine a fault is expensive (two-level page walks), and each page also costs a TLB
entry. Measured on the 2-core development VM (jax 0.10.2, glibc 2.36, Linux 6.18):

* the ResNet-56 metanetwork's forward+backward faulted ~288,000 pages (1.1 GB) per call;
* with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35: malloc asks for transparent
  huge pages with ``madvise``) it faults ~2,000 2 MiB pages. The benchmarks run back to back,
  without then with: ResNet-56 train step 141 -> 227 images/s, meta-training step 3.6 -> 3.1 s,
  metanetwork forward 0.19 -> 0.15 s and forward+backward 1.06 -> 0.66 s, ResNet-50
  ``to_graph`` 100 -> 46 ms (``benchmarks/``; the README has the table). Peak memory did not
  change (the meta step: 2.84 vs 2.83 GB while stepping).

glibc reads its tunables once, when the process starts, so the setting has to be in the
environment of the process: :func:`restart_with_huge_pages` re-executes the current command with
it. ``python -m metaprune_jax`` does so before anything else (the package's ``__init__`` calls
:func:`restart_cli_early` while Python is still locating the ``-m`` module, so the heavy imports
happen once); so do the benchmarks and the test suite's processes. In your own scripts, set it
yourself (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py``) or call
:func:`restart_with_huge_pages` first thing.

Nothing happens (and nothing is needed) off Linux/glibc, with glibc < 2.35, where transparent
huge pages are ``never`` (the kernel would ignore the advice), when the user already chose a
``glibc.malloc.hugetlb`` value, or with ``METAPRUNE_HUGE_PAGES=0`` (opt out).

Huge pages are one of the XLA:CPU settings of ``metaprune_jax.backends.xla_hints`` (its docstring lists
them all) and follow its switch, ``METAPRUNE_JAX_BACKEND_TUNING``: with ``none`` nothing
restarts, and with ``auto`` (the default) nothing restarts where an accelerator is likely to run
the work (:func:`accelerator_likely`: ``JAX_PLATFORMS`` names another platform first, or a GPU or
TPU device file exists). This is decided before jax is imported, so it cannot ask jax for the
backend; on GPUs and TPUs device memory is XLA's own and malloc only serves host-side buffers.

This module imports nothing beyond the standard library (it runs before jax is imported).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, MutableMapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "METAPRUNE_HUGE_PAGES"  # "0": never restart
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
TUNING_ENV = "METAPRUNE_JAX_BACKEND_TUNING"  # see metaprune_jax.backends.xla_hints
TUNING_MODES = ("auto", "cpu", "none")
# device files of accelerators jax can use: NVIDIA, AMD (ROCm), TPU VMs
_ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def tuning_env_mode(environ: Mapping[str, str] = os.environ) -> str:
  """``METAPRUNE_JAX_BACKEND_TUNING`` in ``environ`` (``'auto'`` when unset or empty).

  Raises:
    ValueError: a value other than ``auto``, ``cpu`` or ``none`` (named in the message).
  """
  mode = environ.get(TUNING_ENV, "").strip().lower() or "auto"
  if mode not in TUNING_MODES:
    raise ValueError(f"{TUNING_ENV}={environ.get(TUNING_ENV)!r} is not a backend tuning mode; "
                     f"choose from {TUNING_MODES}")
  return mode


def accelerator_likely(environ: Mapping[str, str] = os.environ,
                       files: tuple = _ACCELERATOR_FILES) -> bool:
  """Whether jax will probably run on a GPU or TPU here (decided without importing jax).

  ``JAX_PLATFORMS`` decides when set (its first platform); otherwise an accelerator's device
  file (``/dev/nvidiactl``, ``/dev/kfd``, ``/dev/accel0``, ...) does.
  """
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() != "cpu"
  return any(os.path.exists(f) for f in files)


def _cpu_settings_wanted(environ: Mapping[str, str]) -> bool:
  mode = tuning_env_mode(environ)
  return mode == "cpu" or (mode == "auto" and not accelerator_likely(environ))


def thp_mode(path: str = _THP_ENABLED) -> Optional[str]:
  """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``) or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_supports_hugetlb() -> bool:
  """Whether this process runs on glibc >= 2.35 (the first with ``glibc.malloc.hugetlb``)."""
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def huge_pages_possible() -> bool:
  """Whether the tunable can take effect here: glibc >= 2.35 and THP ``always`` or ``madvise``."""
  return glibc_supports_hugetlb() and thp_mode() in ("always", "madvise")


def _chosen(environ: Mapping[str, str]) -> Optional[str]:
  """The ``glibc.malloc.hugetlb`` value in ``environ``'s GLIBC_TUNABLES, or None."""
  for item in environ.get("GLIBC_TUNABLES", "").split(":"):
    key, _, value = item.partition("=")
    if key == TUNABLE:
      return value
  return None


def huge_pages_active(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether malloc of this process asks for huge pages (tunable set, THP not ``never``)."""
  value = _chosen(environ)
  return value is not None and value != "0" and huge_pages_possible()


def environ_with_huge_pages(environ: Mapping[str, str]) -> Optional[dict]:
  """A copy of ``environ`` with ``glibc.malloc.hugetlb=1`` added to GLIBC_TUNABLES.

  Returns:
    None when nothing is to be added: the user opted out (``METAPRUNE_HUGE_PAGES=0``) or already
    chose a ``glibc.malloc.hugetlb`` value (their choice stands).
  """
  if environ.get(OPT_OUT, "1") == "0" or _chosen(environ) is not None:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), SETTING]))
  return env


def set_for_subprocesses(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds the tunable to ``environ`` (processes started from here get huge pages). No restart.

  Returns:
    Whether it was added.
  """
  if not huge_pages_possible():
    return False
  env = environ_with_huge_pages(environ)
  if env is None:
    return False
  environ["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]
  return True


def restart_with_huge_pages(argv: Optional[list] = None) -> None:
  """Re-executes this process (same PID, same command line) with huge pages, if useful.

  Returns normally (doing nothing) where huge pages are active already, cannot help, or are
  not wanted (backend tuning ``none``, or an accelerator: see the module docstring). Otherwise
  it does not return. Call it before any work (and before threads are started): ``exec``
  replaces the process.

  Args:
    argv: the command line to run again; default ``sys.orig_argv`` (interpreter options and
      ``-m``/``-c`` included).
  """
  if not huge_pages_possible() or huge_pages_active() or not _cpu_settings_wanted(os.environ):
    return
  env = environ_with_huge_pages(os.environ)
  if env is None:
    return
  argv = list(sys.orig_argv if argv is None else argv)
  if not argv:
    return
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (AttributeError, ValueError):  # no stream, or a closed one: nothing to flush
      continue
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def restart_cli_early() -> None:
  """:func:`restart_with_huge_pages` when this process is ``python -m metaprune_jax``.

  Called by the package's ``__init__``: while Python imports the package of a ``-m`` module,
  ``sys.argv[0]`` is ``"-m"``, so the command restarts before jax and the rest are imported.
  Any other import of the package does nothing here.
  """
  if sys.argv[:1] != ["-m"]:
    return
  orig = list(getattr(sys, "orig_argv", []))
  if "-m" not in orig:
    return
  target = orig[orig.index("-m") + 1:orig.index("-m") + 2]
  if target in (["metaprune_jax"], ["metaprune_jax.modes.cli"], ["metaprune_jax.__main__"]):
    restart_with_huge_pages(orig)
