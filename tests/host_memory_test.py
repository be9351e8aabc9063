"""Huge pages for XLA:CPU's buffers: the environment rules, the restart, and the effect."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

from metaprune_jax.backends import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_USABLE = host_memory.huge_pages_possible()


def _env_without_tunable(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  env.update(PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu", **extra)
  return env


class EnvironmentTest(absltest.TestCase):

  def test_adds_the_tunable_and_keeps_the_others(self):
    env = host_memory.environ_with_huge_pages({"PATH": "/bin"})
    self.assertEqual(env, {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    env = host_memory.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    self.assertEqual(env["GLIBC_TUNABLES"], "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")

  def test_the_users_choice_and_the_opt_out_stand(self):
    for environ in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2:glibc.malloc.arena_max=2"},
                    {host_memory.OPT_OUT: "0"}):
      self.assertIsNone(host_memory.environ_with_huge_pages(environ), environ)

  def test_thp_mode_reads_the_bracketed_choice(self):
    with tempfile.NamedTemporaryFile("w", suffix="enabled", delete=False) as f:
      f.write("always [madvise] never\n")
    self.assertEqual(host_memory.thp_mode(f.name), "madvise")
    os.remove(f.name)
    self.assertIsNone(host_memory.thp_mode(f.name))

  def test_xdist_workers_start_with_huge_pages(self):
    # tests/conftest.py sets the tunable in the controller before it starts the workers, so each
    # worker (and every CLI run it starts) runs with it from its first instruction: the
    # environment this process was started with, not the one it has now.
    if not _USABLE:
      self.skipTest("no glibc >= 2.35 or transparent huge pages disabled")
    if "PYTEST_XDIST_WORKER" not in os.environ:
      self.skipTest("not an xdist worker (the suite runs with -n 2)")
    if os.environ.get(host_memory.OPT_OUT) == "0":
      self.skipTest(f"{host_memory.OPT_OUT}=0: opted out")
    with open("/proc/self/environ", "rb") as f:
      initial = dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)
    self.assertTrue(host_memory.huge_pages_active(initial), initial.get("GLIBC_TUNABLES"))


@absltest.skipUnless(_USABLE, "no glibc >= 2.35 or transparent huge pages disabled")
class RestartTest(absltest.TestCase):

  def _run(self, code, *args, **env):
    out = subprocess.run([sys.executable, "-c", code, *args], env=_env_without_tunable(**env),
                         cwd=_ROOT, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout

  def test_restart_runs_the_same_command_once_with_the_tunable(self):
    code = ("import os, sys; print('start', flush=True); "
            "from metaprune_jax import host_memory; host_memory.restart_with_huge_pages(); "
            "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:], host_memory.huge_pages_active())")
    lines = self._run(code, "a", "b c").splitlines()
    # the first process printed 'start' and was replaced; the second printed both lines
    self.assertEqual(lines, ["start", "start", "glibc.malloc.hugetlb=1 ['a', 'b c'] True"])

  def test_opt_out_keeps_the_process(self):
    code = ("import os; from metaprune_jax import host_memory; "
            "host_memory.restart_with_huge_pages(); "
            "print(os.environ.get('GLIBC_TUNABLES', ''), host_memory.huge_pages_active())")
    self.assertEqual(self._run(code, **{host_memory.OPT_OUT: "0"}).split(), ["False"])

  def test_cli_restarts_before_its_imports(self):
    # `python -m metaprune_jax` restarts while the package is being located (sys.argv[0] ==
    # '-m'): jax is imported once, by the restarted process (two interpreter starts, each
    # opening its import-time table). The config error ends it before the log of the setting.
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    cmd = [sys.executable, "-X", "importtime", "-m", "metaprune_jax",
           f"--config={_ROOT}/configs/digits.py", f"--workdir={workdir}", "--config.mode=nope"]
    out = subprocess.run(cmd, env=_env_without_tunable(), cwd=_ROOT, capture_output=True,
                         text=True, timeout=120)
    self.assertEqual(out.returncode, 2)
    self.assertIn("config error: config.mode='nope': unknown mode", out.stderr)
    starts = [line for line in out.stderr.splitlines()
              if line.startswith("import time: self [us]")]
    self.assertLen(starts, 2)
    jax_imports = [line for line in out.stderr.splitlines()
                   if line.startswith("import time:") and line.split("|")[-1].strip() == "jax"]
    self.assertLen(jax_imports, 1)
    self.assertFalse(os.path.exists(workdir))

  def test_huge_pages_cut_the_page_faults_of_a_jitted_call(self):
    # The property the setting is for: a call's fresh 64 MB output buffer is faulted in with
    # 2 MiB pages instead of 4 KiB ones.
    code = """
import json, resource, jax, jax.numpy as jnp
from metaprune_jax.backends import host_memory
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 2**20,), jnp.float32)
for _ in range(3):
  jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  jax.block_until_ready(f(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"faults": faults, "active": host_memory.huge_pages_active()}))
"""
    small = json.loads(self._run(code).splitlines()[-1])
    self.assertFalse(small["active"])
    self.assertGreater(small["faults"], 2000)  # 16,384 4 KiB pages, unless glibc reuses them
    huge = json.loads(self._run(code, GLIBC_TUNABLES=host_memory.SETTING).splitlines()[-1])
    self.assertTrue(huge["active"])
    self.assertLess(huge["faults"], small["faults"] / 4)


if __name__ == "__main__":
  absltest.main()
