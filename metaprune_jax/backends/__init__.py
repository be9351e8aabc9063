"""Backend-specific tuning: the XLA:CPU settings, its C++ kernels and host memory, applied on the CPU backend only (backends/xla_hints.py says what and why)."""
