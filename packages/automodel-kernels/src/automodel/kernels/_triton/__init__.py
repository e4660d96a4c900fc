"""Triton kernels behind ``backend="triton"``; imported lazily, only when that backend runs.

Each module pairs ``@triton.jit`` kernels with a ``torch.autograd.Function`` and a wrapper whose
signature mirrors the public op. The math is fp32 in registers whatever the storage dtype.
"""
