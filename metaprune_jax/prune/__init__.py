"""Structured channel pruning: dependency groups, masks, the group-norm regulariser and the progressive pruning search (docs/design.md sections 6-7)."""
