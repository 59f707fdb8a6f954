"""Triton kernels of the device backends: fused delta + Gram, fused weighted sum, batched eigensolver.

Each module holds its ``@triton.jit`` kernels next to the host function that
launches them on torch device tensors (current stream, no synchronisation).
Importing this package needs nothing; importing a module needs triton.
"""
