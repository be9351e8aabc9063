r"""Can the metanetwork lower the relative regulariser when nothing else is in its loss?

  python benchmarks/metanet_capacity.py --data_models=DIR [--steps 150] [--models 4]

``DIR`` holds a run's data models (a ``generate`` workdir, e.g. the recipe search's
``<out>/shared/seed_100``). For each metanetwork variant (with and without the node-importance
input; PyTorch-like init or a zero-initialised final decoder layer, i.e. an exact identity map at
the start) this trains the digits recipe's metanetwork (3 x 16, residual ratios 0.1) with Adam
(lr 3e-3) on the relative group regulariser alone (``reg`` 1, ``alpha`` 16, masked data models in
turn), and prints JSON: the regulariser's mean over the data models before and after. Its floor
is the number of groups (every group's norm in its most important channel); a metanetwork that
cannot express "shrink a channel by where it stands in its group" leaves it where it is.
docs/recipe_search.md (fourth round) reads it against meta-training, where the cross-entropy is in
the loss too.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metaprune_jax.graphs import graph as graph_lib
from metaprune_jax.metanetwork import metanet as metanet_lib
from metaprune_jax.metanetwork import metatrain
from metaprune_jax.nets import zoo
from metaprune_jax.prune import groups as groups_lib
from metaprune_jax.prune.regularizer import regularizer
from metaprune_jax.runtime import datamodels


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data_models", required=True, help="a generate workdir (its data models)")
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--models", type=int, default=4)
  ap.add_argument("--arch", default="resnet8")
  args = ap.parse_args()
  full = zoo.get_arch(args.arch, 10)
  dms = [datamodels.load_data_model(args.data_models, i) for i in range(args.models)]
  slots = [metatrain.make_slot(full, d.variables, d.keep) for d in dms]
  out = {"arch": args.arch, "steps": args.steps, "models": args.models,
         "floor": len(groups_lib.pruning_groups(full)), "variants": {}}
  for importance_input in (False, True):
    for zero_decoder in (False, True):
      mc = metanet_lib.make_metanet_config(3, 16, graph_lib.node_dim(full),
                                           graph_lib.edge_kinds(full), 0.1, 0.1,
                                           importance_input=importance_input)
      phi = metanet_lib.init_metanet(mc, jax.random.PRNGKey(0))
      if zero_decoder:  # the decoders' last Dense at zero: the metanetwork starts as identity
        phi = {k: ({**v, "dense2": jax.tree_util.tree_map(jnp.zeros_like, v["dense2"])}
                   if "dec" in k else v) for k, v in phi.items()}
      spec = metatrain._spec(mc)  # pylint: disable=protected-access

      def loss(phi, slot, spec=spec):
        th = metatrain.transformed_params(spec, phi, full, slot)
        return regularizer(full, {"params": th}, 16.0, 1.0, "max", masks=slot.masks,
                           form="relative")
      f = jax.jit(jax.value_and_grad(loss))
      tx = optax.adam(3e-3)
      state = tx.init(phi)
      before = float(np.mean([float(f(phi, s)[0]) for s in slots]))
      t = time.perf_counter()
      for i in range(args.steps):
        _, g = f(phi, slots[i % len(slots)])
        updates, state = tx.update(g, state, phi)
        phi = optax.apply_updates(phi, updates)
      after = float(np.mean([float(f(phi, s)[0]) for s in slots]))
      name = f"importance_input={importance_input},zero_decoder={zero_decoder}"
      out["variants"][name] = {"before": round(before, 3), "after": round(after, 3),
                               "train_s": round(time.perf_counter() - t, 1)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
