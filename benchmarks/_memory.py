"""Process memory figures for the benchmarks (Linux /proc; None elsewhere)."""


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
