"""Networks as graphs: channels are nodes, weights are edges (docs/design.md section 3)."""
