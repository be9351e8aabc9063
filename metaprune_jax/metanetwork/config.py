"""The metanetwork's config: its fields, the paper's defaults per task, the matmul precision.

A config is an ``ml_collections.ConfigDict`` (:func:`make_metanet_config`,
:func:`default_metanet_config`); :func:`_spec` turns it into the hashable :class:`_Spec` that the
model and the jitted forward take as a static argument.
"""

from typing import NamedTuple, Tuple

import jax
import ml_collections

_DEFAULTS = {
    # task: (num_layers, hidden, node_dim, edge_dims, node_res_ratio, edge_res_ratio)
    "resnet56": (8, 64, 8, (9,), 0.01, 0.01),
    "resnet110": (8, 64, 8, (9,), 0.01, 0.01),
    "vgg19": (8, 32, 5, (9,), 0.05, 0.05),
    "resnet50": (6, 16, 8, (49, 9, 1), 0.0005, 0.0005),
    "digits": (2, 16, 8, (9,), 0.01, 0.01),
}


# jax.lax.Precision's names (its enum values and their aliases)
PRECISIONS = ("default", "high", "highest", "fastest", "bfloat16", "tensorfloat32", "float32")


def matmul_precision(name: str) -> jax.lax.Precision:
  """The ``jax.lax.Precision`` named ``name`` (``config.metanet.precision``).

  ``'highest'`` (float32 products on every backend) where parity with the reference is checked;
  ``'default'`` lets the backend choose (on the CPU the same float32 products; on TPUs and on
  GPUs with TF32, bfloat16/TF32 passes, several times faster).

  Raises:
    ValueError: a name XLA does not know (the message names it and lists the known ones).
  """
  if not isinstance(name, str) or name.lower() not in PRECISIONS:
    raise ValueError(f"unknown metanetwork matmul precision {name!r}; XLA knows {PRECISIONS}")
  return jax.lax.Precision(name.lower())


def make_metanet_config(num_layers, hidden, node_dim, edge_dims, node_res_ratio,
                        edge_res_ratio, precision: str = "default",
                        importance_input: bool = False) -> ml_collections.ConfigDict:
  """Builds a metanetwork config block.

  Args:
    num_layers: number of message-passing layers L.
    hidden: hidden width h.
    node_dim: node feature width (8 for ResNets, 5 for VGG).
    edge_dims: per-kind edge feature widths, in the graph's kind order, e.g. ``(9,)`` or
      ``(49, 9, 1)``.
    node_res_ratio: scale of the node decoder's output added to the input node features.
    edge_res_ratio: same for the edges.
    precision: the metanetwork's matmul precision (:func:`matmul_precision`): ``'highest'``
      where parity with the reference is checked, ``'default'`` (the backend's) otherwise.
    importance_input: also give the node encoder each node's normalised group importance
      (its channel's group-L2 importance over its group's maximum, 1 for input and class
      nodes) as one more input column: where the channel stands in its group, which message
      passing cannot compute (docs/recipe_search.md, fourth round). Not in the reference (False
      keeps parity).

  Returns:
    An ``ml_collections.ConfigDict`` with those fields.

  Raises:
    ValueError: an unknown precision name.
  """
  matmul_precision(precision)
  extra = {"importance_input": True} if importance_input else {}  # absent: the reference's
  return ml_collections.ConfigDict({
      "num_layers": int(num_layers),
      "hidden": int(hidden),
      "node_dim": int(node_dim),
      "edge_dims": tuple(int(d) for d in edge_dims),
      "node_res_ratio": float(node_res_ratio),
      "edge_res_ratio": float(edge_res_ratio),
      "precision": str(precision).lower(),
      **extra,
  })


def default_metanet_config(task: str) -> ml_collections.ConfigDict:
  """The paper's metanetwork config for a task.

  Args:
    task: one of 'resnet56', 'resnet110', 'vgg19', 'resnet50', 'digits' (a small CPU config).

  Returns:
    The config (see ``make_metanet_config``).

  Raises:
    ValueError: for an unknown task.
  """
  if task not in _DEFAULTS:
    raise ValueError(f"No default metanetwork config for task {task!r}; known: "
                     f"{sorted(_DEFAULTS)}")
  return make_metanet_config(*_DEFAULTS[task])


class _Spec(NamedTuple):
  """Hashable, static view of a metanetwork config (a jit static argument)."""
  num_layers: int
  hidden: int
  node_dim: int
  edge_dims: Tuple[int, ...]
  node_res_ratio: float
  edge_res_ratio: float
  precision: str = "default"
  importance_input: bool = False


def _spec(config) -> _Spec:
  precision = str(config.get("precision", "default")).lower()
  matmul_precision(precision)
  return _Spec(int(config.num_layers), int(config.hidden), int(config.node_dim),
               tuple(int(d) for d in config.edge_dims), float(config.node_res_ratio),
               float(config.edge_res_ratio), precision,
               bool(config.get("importance_input", False)))
