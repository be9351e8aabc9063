"""`python -m metaprune_jax`: see `metaprune_jax.modes.cli`."""

from metaprune_jax.modes import cli as main

main.run()
