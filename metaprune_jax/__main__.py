"""`python -m metaprune_jax`: see `metaprune_jax.main`."""

from metaprune_jax import main

main.run()
