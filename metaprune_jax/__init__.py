"""MetaPrune-JAX: Meta Pruning via Graph Metanetworks (Liu, Wang, Zhang, 2025) in JAX/Flax.

Public API (re-exports only). See README.md and DESIGN.md.
"""

# `python -m metaprune_jax`: restart with huge pages before the heavy imports (host_memory).
from metaprune_jax import host_memory  # noqa: E402  (standard library only)
host_memory.restart_cli_early()
from metaprune_jax import _compat  # noqa: F401  (jraph shim, before anything imports jraph)
from metaprune_jax import zoo
from metaprune_jax.arch import Arch, Layer, Op
from metaprune_jax.cnn import apply_model, init_variables
from metaprune_jax.graph import (from_graph, graph_from_reference_arrays, graph_layout,
                                 graph_to_reference_arrays, reference_edge_order, to_graph)
from metaprune_jax.groups import Group, Member, group_importance, pruning_groups
from metaprune_jax.macs import count_macs
from metaprune_jax.masks import embed, full_masks, mask_variables, materialize
from metaprune_jax.pruning import (PruneResult, adaptive_prune, progressive_prune, prune_to_target,
                                   pruning_trajectory)
from metaprune_jax.reference import export_reference_state_dict, import_reference_model
from metaprune_jax.regularizer import regularizer
from metaprune_jax import masks  # noqa: E402  (module: masks_from_keep, kept_indices, ...)
from metaprune_jax.metanet import (MetaNet, apply_metanet, default_metanet_config,
                                   export_reference_metanet, import_reference_metanet,
                                   init_metanet, make_metanet_config, pad_graph,
                                   scramble_classifier, transform, unpad_graph,
                                   validate_graph)

# Training runtime (issue 6).
from metaprune_jax import modes  # noqa: E402
from metaprune_jax.checkpoint import CheckpointError  # noqa: E402
from metaprune_jax.data import get_dataset  # noqa: E402
from metaprune_jax.state import TrainState  # noqa: E402
from metaprune_jax.train import FitResult, evaluate, fit, load_run  # noqa: E402

# Meta-learning (issue 7).
from metaprune_jax.metatrain import meta_train_grads  # noqa: E402
from metaprune_jax.meta_modes import load_metanet, metanet_epochs  # noqa: E402

get_arch = zoo.get_arch
from metaprune_jax.prune_mode import load_pruned  # noqa: E402  (issue 8: the final network)
