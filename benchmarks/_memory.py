"""Process memory figures for the benchmarks (Linux /proc; None elsewhere)."""

import resource
import sys


def process_peak_rss_mb() -> float:
  """The process's peak RSS since it started (``ru_maxrss``: KB on Linux, bytes on macOS), in MB."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return round(kb / 1024 / (1024 if sys.platform == "darwin" else 1), 1)


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark (VmHWM) of this process to its current RSS (Linux >= 4.0).

  Returns:
    Whether it could.
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def vm_mb(key: str):
  """``/proc/self/status`` field ``key`` (``VmRSS``, ``VmHWM``, ...) in MB, or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return round(int(line.split()[1]) / 1024, 1)
  except OSError:
    pass
  return None


def huge_pages_first() -> dict:
  """Restarts this benchmark with transparent huge pages, as the CLI runs (see
  ``metaprune_jax.backends.host_memory``; ``METAPRUNE_HUGE_PAGES=0`` measures without them), then returns
  the setting to report: ``{"huge_pages": bool, "glibc_tunables": str}``."""
  import os  # pylint: disable=import-outside-toplevel
  from metaprune_jax.backends import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.restart_with_huge_pages()
  return {"huge_pages": host_memory.huge_pages_active(),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
