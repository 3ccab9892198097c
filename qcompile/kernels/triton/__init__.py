"""Triton kernels for CUDA (written for the H200; Hopper has no int4 tensor cores, so A4/A8 use the
int8 ``tl.dot``). Importing this package imports Triton: only ``ops.py``'s CUDA implementations do,
on first use."""
