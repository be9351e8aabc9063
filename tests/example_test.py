"""The worked example of docs/own_network.md runs end to end (one epoch per training run)."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OwnNetworkExampleTest(absltest.TestCase):

  def test_trace_prune_finetune_save_back(self):
    workdir = tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(_ROOT, "examples", "own_network.py"),
                          f"--workdir={workdir}", "--epochs=1"], env=env, cwd=_ROOT,
                         capture_output=True, text=True, timeout=600)
    self.assertEqual(out.returncode, 0, out.stderr[-3000:])
    lines = out.stdout.splitlines()
    for start in ("traced:", "trained:", "pruned:", "finetuned:", "saved back:"):
      self.assertTrue(any(l.startswith(start) for l in lines), (start, out.stdout))
    # the pruned widths went back into the user's own module, which computes the same logits
    self.assertIn("its own module computes the same logits", out.stdout)
    pruned = [l for l in lines if l.startswith("pruned:")][0]
    self.assertGreaterEqual(float(pruned.split()[1].rstrip("x,")), 2.0)


if __name__ == "__main__":
  absltest.main()
