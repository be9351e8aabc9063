"""File-tree helpers shared by the tests that check "nothing was written or overwritten"."""

import hashlib
import os


def snapshot(root: str) -> dict[str, str]:
  """{relative path: sha1} of every file under root (empty for a missing root)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out
