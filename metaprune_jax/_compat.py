"""Import shims for the pinned stack, applied once before any jraph import.

jraph 0.0.6.dev0 still calls ``jax.tree_map`` / ``jax.tree_leaves``, which jax removed in
0.6; without these aliases ``jraph.pad_with_graphs`` and friends raise AttributeError. Every
module of this package imports jraph through :data:`jraph` below, never directly.
"""

import jax

for _name in ("tree_map", "tree_leaves", "tree_flatten", "tree_unflatten", "tree_structure"):
  if not hasattr(jax, _name):
    setattr(jax, _name, getattr(jax.tree_util, _name))

import jraph  # noqa: E402  (must follow the aliases above)

__all__ = ["jraph"]
