"""Inference accelerators (sync-free ops, fused kernels, compile, CUDA graphs); outputs equal the plain path."""
