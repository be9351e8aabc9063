"""MetaPrune-JAX: Meta Pruning via Graph Metanetworks (Liu, Wang, Zhang, 2025) in JAX/Flax.

The functional API (architectures, graphs, metanetwork, groups, masks, MACs, pruning, reference
interop) is imported with the package; the training runtime and the run modes (`fit`,
`load_run`, `get_dataset`, `load_metanet`, `load_pruned`, ... and their modules) load on first
use (PEP 562 `__getattr__`), so `import metaprune_jax` pulls in neither Orbax, Grain,
tensorboardX, tqdm nor matplotlib. `__all__` lists the public names; every submodule stays
reachable as `metaprune_jax.<module>`. See README.md and docs/design.md.
"""

# `python -m metaprune_jax`: restart with huge pages before the heavy imports (host_memory).
from metaprune_jax.backends import host_memory  # noqa: E402  (standard library only)
host_memory.restart_cli_early()

import importlib  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
import sys  # noqa: E402

from metaprune_jax.prune import masks  # noqa: E402,F401  (module: masks_from_keep, kept_indices, ...)
from metaprune_jax.nets import zoo  # noqa: E402
from metaprune_jax.nets.arch import Arch, Layer, Op  # noqa: E402
from metaprune_jax.nets.cnn import apply_model, init_variables  # noqa: E402
from metaprune_jax.graphs.graph import (from_graph, graph_from_reference_arrays,  # noqa: E402
                                 graph_layout, graph_to_reference_arrays, reference_edge_order,
                                 to_graph)
from metaprune_jax.nets.inference import fold_batchnorm, inference_form, pad_channels  # noqa: E402
from metaprune_jax.nets.macs import count_macs  # noqa: E402
from metaprune_jax.prune.groups import Group, Member, group_importance, pruning_groups  # noqa: E402
from metaprune_jax.prune.masks import embed, full_masks, mask_variables, materialize  # noqa: E402
from metaprune_jax.metanetwork.metanet import (MetaNet, apply_metanet, default_metanet_config,  # noqa: E402
                                   export_reference_metanet, import_reference_metanet,
                                   init_metanet, make_metanet_config, pad_graph,
                                   scramble_classifier, transform, unpad_graph,
                                   validate_graph)
from metaprune_jax.prune.pruning import (PruneResult, adaptive_prune, progressive_prune,  # noqa: E402
                                   prune_to_target, pruning_trajectory)
from metaprune_jax.nets.reference import (export_reference_state_dict,  # noqa: E402
                                     import_reference_model)
from metaprune_jax.prune.regularizer import regularizer  # noqa: E402
from metaprune_jax.version import __version__  # noqa: E402,F401

get_arch = zoo.get_arch

# name -> (module, attribute): loaded on first access.
_LAZY = {
  # Training runtime (issue 6).
  "CheckpointError": ("runtime.checkpoint", "CheckpointError"),
  "get_dataset": ("runtime.data", "get_dataset"),
  "TrainState": ("runtime.state", "TrainState"),
  "FitResult": ("runtime.train", "FitResult"),
  "evaluate": ("runtime.train", "evaluate"),
  "fit": ("runtime.train", "fit"),
  "load_run": ("runtime.train", "load_run"),
  # Meta-learning (issue 7).
  "meta_train_grads": ("metanetwork.metatrain", "meta_train_grads"),
  "load_metanet": ("modes.common", "load_metanet"),
  "metanet_epochs": ("modes.common", "metanet_epochs"),
  # The final network (issue 8).
  "load_pruned": ("modes.prune", "load_pruned"),
  # Your own Flax network: the architecture description derived by tracing.
  "from_flax": ("nets.trace", "from_flax"),
  "to_flax_variables": ("nets.trace", "to_flax_variables"),
  "from_nnx": ("nets.trace", "from_nnx"),
  "nnx_variables": ("nets.trace", "nnx_variables"),
  "update_nnx": ("nets.trace", "update_nnx"),
  "TraceError": ("nets.trace", "TraceError"),
  "arch_from_factory": ("nets.trace", "arch_from_factory"),
  # Backend-specific tuning (XLA:CPU settings; applied on the CPU backend only).
  "backend_tuning": ("backends.xla_hints", "backend_tuning"),
  "cpu_tuning": ("backends.xla_hints", "cpu_tuning"),
}

# The modules of the flat layout before the subpackages, by their place now: still reachable as
# `metaprune_jax.<name>` (attribute, `from metaprune_jax import <name>`, `import
# metaprune_jax.<name>`), so external code keeps working. `regularizer` is the function (as it
# always was), not the module.
_MOVED = {
  # networks and the architecture description
  "arch": "nets.arch", "cnn": "nets.cnn", "zoo": "nets.zoo", "macs": "nets.macs",
  "inference": "nets.inference", "flax_resnet": "nets.flax_resnet", "trace": "nets.trace",
  "reference": "nets.reference",
  # graphs, metanetwork, pruning
  "graph": "graphs.graph", "metanet": "metanetwork.metanet", "metanet_blocks":
  "metanetwork.blocks", "metatrain": "metanetwork.metatrain", "groups": "prune.groups",
  "masks": "prune.masks", "pruning": "prune.pruning",
  # training runtime
  "data": "runtime.data", "train": "runtime.train", "steps": "runtime.steps",
  "state": "runtime.state", "optim": "runtime.optim", "sharding": "runtime.sharding",
  "checkpoint": "runtime.checkpoint", "metric_writers": "runtime.metric_writers",
  "datamodels": "runtime.datamodels",
  # run modes
  "main": "modes.cli", "config_check": "modes.config_check", "pipeline": "modes.common",
  "meta_modes": "modes.meta", "visualize": "modes.visualize", "prune_mode": "modes.prune",
  # backend-specific tuning
  "xla_hints": "backends.xla_hints", "cpu_kernels": "backends.cpu_kernels",
  "host_memory": "backends.host_memory",
}
_SUBPACKAGES = frozenset(("nets", "graphs", "metanetwork", "prune", "runtime", "modes",
                          "backends", "version"))


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """`import metaprune_jax.<old name>` gives the module at its new place (one module object)."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    package, _, name = fullname.rpartition(".")
    if package != __name__ or name not in _MOVED:
      return None
    return importlib.machinery.ModuleSpec(fullname, self)

  def create_module(self, spec):
    module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
    spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's
    return module

  def exec_module(self, module):
    module.__spec__ = module.__spec__.loader_state or module.__spec__  # keep its own spec


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
  sys.meta_path.insert(0, _MovedModules())
# `metaprune_jax.regularizer` is the function; the module of that name (earlier layout) still
# imports: `from metaprune_jax.regularizer import regularizer`.
sys.modules.setdefault(f"{__name__}.regularizer", sys.modules[f"{__name__}.prune.regularizer"])


__all__ = [
  # Architectures and networks.
  "Arch", "Layer", "Op", "get_arch", "apply_model", "init_variables", "count_macs",
  "fold_batchnorm", "pad_channels", "inference_form",
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
  if name in _MOVED:
    return importlib.import_module(f"{__name__}.{_MOVED[name]}")
  if name in _SUBPACKAGES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY) | set(_MOVED) | _SUBPACKAGES)
