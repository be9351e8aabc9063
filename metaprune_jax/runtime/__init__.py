"""The training runtime: datasets, train/eval steps, sharding, checkpoints, metrics, the data-model store."""
