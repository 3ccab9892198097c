"""INT4 kernels as ``torch.ops.qcompile.*`` custom ops (declared in ``ops.py``).

Each op has a plain-torch reference (``reference.py``, the ground truth and the CPU implementation),
a Triton implementation used for CUDA tensors (``triton/``, imported on first use only), and a fake
implementation for ``torch.export`` / ``torch.compile``. Backend weight layouts derive from the
canonical packed format in ``layout.py``.
"""

from qcompile.kernels.ops import hadamard, linear_w4a4, linear_w4a8, linear_w4a16, quantize_per_token


def hadamard_kernel_supported(n: int, block: int = 0) -> bool:
    """Whether the CUDA implementation rotates this size in Triton (else with torch ops, on the GPU)."""
    from qcompile.kernels.hadamard_plan import plan_unit

    return plan_unit(n if block == 0 else block) is not None


__all__ = [
    "hadamard",
    "hadamard_kernel_supported",
    "linear_w4a16",
    "linear_w4a4",
    "linear_w4a8",
    "quantize_per_token",
]
