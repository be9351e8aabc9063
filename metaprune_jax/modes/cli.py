"""Command line: `python -m metaprune_jax --config=configs/<file>.py --workdir=<dir>`.

Any config field can be overridden with `--config.<field>=<value>` (ml_collections config_flags,
locked: unknown fields are errors); `config.mode` selects the run mode (`modes.py`). Multi-host
runs call `jax.distributed.initialize()` when the launcher exported `METAPRUNE_MULTIHOST=1`
(coordinator, process count and id from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`, or auto-detected on SLURM / Cloud TPU). The logic lives in importable modules;
this file only parses flags.

An invalid command line or config (`config_check.check_config`: unknown names, non-positive
sizes, batches the devices do not divide) ends before any work with one line on stderr,
`config error: config.<field>=<value>: <fix>`, and exit status 2; nothing is written.
"""

import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from metaprune_jax import modes
from metaprune_jax.backends import host_memory
from metaprune_jax.modes import config_check

EXIT_CONFIG_ERROR = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops Orbax's per-save INFO chatter so the log shows one line per epoch."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _config_error(message: str) -> None:
  """Prints `message` as one line on stderr and exits with status 2 (before any work)."""
  line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
  sys.stderr.write(f"config error: {line}\n")
  sys.stderr.flush()
  sys.exit(EXIT_CONFIG_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a parse error (a bad `--config.<field>` value, a missing flag,
  a config file that does not load) reported as one line, exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError) as e:
    _config_error(str(e))
  except (KeyError, AttributeError) as e:  # config_flags: an override of a field not defined
    _config_error(f"a --config.<field> flag names no field of the config ({e}); use the "
                  f"fields of the config file (an override cannot add one)")


def _maybe_initialize_distributed() -> None:
  if os.environ.get("METAPRUNE_MULTIHOST", "0") != "1":
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
              "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
              "process_id": int(os.environ["JAX_PROCESS_ID"])}
  jax.distributed.initialize(**kwargs)


def main(argv) -> None:
  if len(argv) > 1:
    _config_error(f"unexpected arguments {argv[1:]}; pass settings as --config.<field>=<value>")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _maybe_initialize_distributed()
  try:
    config = _CONFIG.value
    config.get("mode")  # a config file that did not load raises here
  except OSError as e:
    _config_error(f"--config={flags.FLAGS['config'].serialize().partition('=')[2]}: {e}")
  try:  # before any work: nothing is written for an invalid config
    config_check.check_config(config)
  except ValueError as e:  # config_check.ConfigError and the checks' own ValueErrors
    _config_error(str(e))
  logging.info("process %d/%d, %d local / %d global devices (%s); mode %s; workdir %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, config.mode, _WORKDIR.value)
  logging.info("host memory: transparent huge pages %s (GLIBC_TUNABLES=%r, THP mode %s; "
               "metaprune_jax.backends.host_memory)",
               "on" if host_memory.huge_pages_active() else "off",
               os.environ.get("GLIBC_TUNABLES", ""), host_memory.thp_mode())
  if config.get("log_compiles"):
    jax.config.update("jax_log_compiles", True)
  modes.run(config, _WORKDIR.value)


def run() -> None:
  # `python -m metaprune_jax` restarted already (the package's __init__); other launches of
  # this entry point restart here, before any work.
  host_memory.restart_with_huge_pages()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
