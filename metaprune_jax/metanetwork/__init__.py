"""The metanetwork: the GNN over a network's graph, its message-passing blocks and meta-training's gradients (docs/design.md sections 4-5)."""
