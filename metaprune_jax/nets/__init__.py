"""Networks: the architecture description (Arch), the network it runs, the zoo, MACs, inference forms, Flax tracing, reference (PyTorch) interop."""
