"""MetaPrune-JAX: Meta Pruning via Graph Metanetworks (Liu, Wang, Zhang, 2025) in JAX/Flax.

The functional API (architectures, graphs, metanetwork, groups, masks, MACs, pruning, reference
interop) is imported with the package; the training runtime and the run modes (`fit`,
`load_run`, `get_dataset`, `load_metanet`, `load_pruned`, ... and their modules) load on first
use (PEP 562 `__getattr__`), so `import metaprune_jax` pulls in neither Orbax, Grain,
tensorboardX, tqdm nor matplotlib. `__all__` lists the public names; every submodule stays
reachable as `metaprune_jax.<module>`. See README.md and docs/design.md.
"""

# `python -m metaprune_jax`: restart with huge pages before the heavy imports (host_memory).
from metaprune_jax import host_memory  # noqa: E402  (standard library only)
host_memory.restart_cli_early()

import importlib  # noqa: E402

from metaprune_jax import masks  # noqa: E402,F401  (module: masks_from_keep, kept_indices, ...)
from metaprune_jax import zoo  # noqa: E402
from metaprune_jax.arch import Arch, Layer, Op  # noqa: E402
from metaprune_jax.cnn import apply_model, init_variables  # noqa: E402
from metaprune_jax.graph import (from_graph, graph_from_reference_arrays,  # noqa: E402
                                 graph_layout, graph_to_reference_arrays, reference_edge_order,
                                 to_graph)
from metaprune_jax.inference import fold_batchnorm  # noqa: E402
from metaprune_jax.groups import Group, Member, group_importance, pruning_groups  # noqa: E402
from metaprune_jax.macs import count_macs  # noqa: E402
from metaprune_jax.masks import embed, full_masks, mask_variables, materialize  # noqa: E402
from metaprune_jax.metanet import (MetaNet, apply_metanet, default_metanet_config,  # noqa: E402
                                   export_reference_metanet, import_reference_metanet,
                                   init_metanet, make_metanet_config, pad_graph,
                                   scramble_classifier, transform, unpad_graph,
                                   validate_graph)
from metaprune_jax.pruning import (PruneResult, adaptive_prune, progressive_prune,  # noqa: E402
                                   prune_to_target, pruning_trajectory)
from metaprune_jax.reference import (export_reference_state_dict,  # noqa: E402
                                     import_reference_model)
from metaprune_jax.regularizer import regularizer  # noqa: E402
from metaprune_jax.version import __version__  # noqa: E402,F401

get_arch = zoo.get_arch

# name -> (module, attribute): loaded on first access.
_LAZY = {
  # Training runtime (issue 6).
  "CheckpointError": ("checkpoint", "CheckpointError"),
  "get_dataset": ("data", "get_dataset"),
  "TrainState": ("state", "TrainState"),
  "FitResult": ("train", "FitResult"),
  "evaluate": ("train", "evaluate"),
  "fit": ("train", "fit"),
  "load_run": ("train", "load_run"),
  # Meta-learning (issue 7).
  "meta_train_grads": ("metatrain", "meta_train_grads"),
  "load_metanet": ("meta_modes", "load_metanet"),
  "metanet_epochs": ("meta_modes", "metanet_epochs"),
  # The final network (issue 8).
  "load_pruned": ("prune_mode", "load_pruned"),
  # Your own Flax network: the architecture description derived by tracing.
  "from_flax": ("trace", "from_flax"),
  "to_flax_variables": ("trace", "to_flax_variables"),
  "from_nnx": ("trace", "from_nnx"),
  "nnx_variables": ("trace", "nnx_variables"),
  "update_nnx": ("trace", "update_nnx"),
  "TraceError": ("trace", "TraceError"),
  "arch_from_factory": ("trace", "arch_from_factory"),
  # Backend-specific tuning (XLA:CPU settings; applied on the CPU backend only).
  "backend_tuning": ("xla_hints", "backend_tuning"),
  "cpu_tuning": ("xla_hints", "cpu_tuning"),
}

# Submodules reachable as `metaprune_jax.<name>` without an import statement (as before the
# runtime became lazy). `regularizer` is the function (as it always was), not the module.
_SUBMODULES = frozenset((
  "arch", "checkpoint", "cnn", "config_check", "cpu_kernels", "data", "datamodels", "graph",
  "groups", "host_memory", "macs", "masks", "meta_modes", "metanet", "metanet_blocks",
  "metatrain", "metric_writers", "modes", "optim", "pipeline", "prune_mode", "pruning",
  "reference", "sharding", "state", "steps", "train", "version", "visualize", "xla_hints", "zoo",
  "trace", "flax_resnet", "inference",
))

__all__ = [
  # Architectures and networks.
  "Arch", "Layer", "Op", "get_arch", "apply_model", "init_variables", "count_macs",
  "fold_batchnorm",
  # Graphs of networks.
  "to_graph", "from_graph", "graph_layout", "reference_edge_order",
  "graph_to_reference_arrays", "graph_from_reference_arrays",
  # Metanetwork.
  "MetaNet", "apply_metanet", "default_metanet_config", "make_metanet_config", "init_metanet",
  "transform", "pad_graph", "unpad_graph", "validate_graph", "scramble_classifier",
  "export_reference_metanet", "import_reference_metanet",
  # Groups, masks, pruning, regulariser.
  "Group", "Member", "pruning_groups", "group_importance", "embed", "full_masks",
  "mask_variables", "materialize", "PruneResult", "prune_to_target", "progressive_prune",
  "adaptive_prune", "pruning_trajectory", "regularizer",
  # Reference interop.
  "import_reference_model", "export_reference_state_dict",
  # Training runtime and run outputs (lazy).
  *_LAZY,
]


def __getattr__(name: str):
  """PEP 562: the runtime's names and the submodules, imported on first access."""
  if name in _LAZY:
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
