"""Triton weight-gradient update of the chunked linear cross-entropy: ``C += A.T @ B`` in place.

With a few hundred tokens per chunk, ``grad_w += dlogits.T @ hidden`` is bound by reading and
writing ``grad_w`` (``[V, H]``, bf16) once per chunk, not by its matmul. cuBLAS's ``addmm_`` loads
``C`` in its epilogue, after the short main loop, so the load and the store of each tile are not
overlapped with anything. This kernel issues the load of its ``C`` tile first, before the main loop,
so that the read of ``C`` is in flight while the tile's products are computed, accumulates in fp32
from ``C``'s value, and rounds to ``C``'s dtype once: the same rounding as ``addmm_``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# enabled: linear_cross_entropy's per-chunk weight-gradient update uses this kernel (else cuBLAS's
# addmm_); then the tile of C per program and the main loop's step over the chunk's tokens.
# Benchmarks may change it.
TUNING = {
    "enabled": 1,
    "block_m": 128,
    "block_n": 128,
    "block_k": 64,
    "num_warps": 8,
    "num_stages": 3,
}


@triton.jit
def _addmm_at_b_kernel(
    C,
    A,
    B,
    M,
    N,
    K,
    stride_cm,
    stride_ak,
    stride_bk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``C[M, N] += A[K, M].T @ B[K, N]`` for one ``BLOCK_M x BLOCK_N`` tile of ``C``."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a strip of A (the same rows of C), which then stays in L2.
    pid_m, pid_n = pid // tiles_n, pid % tiles_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rm < M, rn < N
    c_ptrs = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(c_ptrs, mask=mask_c, other=0.0).to(tl.float32)
    for k in range(0, K, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        # A is [K, M] row-major: its transpose's tile is read column by column.
        a = tl.load(
            A + rk[None, :].to(tl.int64) * stride_ak + rm[:, None],
            mask=mask_k[None, :] & mask_m[:, None],
            other=0.0,
        )
        b = tl.load(
            B + rk[:, None].to(tl.int64) * stride_bk + rn[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if DOT_FP32:  # the CPU interpreter's bf16 dot is wrong; fp32 products of bf16 are exact
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_c)


def addmm_at_b_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Returns ``c`` after ``c += a.T @ b`` in place (fp32 accumulation, one rounding to ``c``).

    ``c`` is ``[M, N]``, ``a`` ``[K, M]`` and ``b`` ``[K, N]``, all row-major with unit last stride
    and one 16-bit float dtype (bf16 or fp16): fp32 would multiply in TF32 here, so fp32 callers use
    ``torch.addmm`` instead.
    """
    if not (c.dtype == a.dtype == b.dtype and c.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(
            f"addmm_at_b_: c, a and b must share a bf16 or fp16 dtype; got {c.dtype}, {a.dtype}, "
            f"{b.dtype}. Use torch.addmm for other dtypes"
        )
    (m, n), (k, m_a), (k_b, n_b) = c.shape, a.shape, b.shape
    if (m_a, k_b, n_b) != (m, k, n):
        raise ValueError(
            f"addmm_at_b_: expected a [K, M] and b [K, N] for c [M, N] = {[m, n]}; got a "
            f"{list(a.shape)} and b {list(b.shape)}"
        )
    if c.stride(1) != 1 or a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError(
            "addmm_at_b_: c, a and b need a unit last stride (row-major rows); pass contiguous "
            "tensors or row slices of them"
        )
    t = TUNING
    grid = (triton.cdiv(m, t["block_m"]) * triton.cdiv(n, t["block_n"]),)
    _addmm_at_b_kernel[grid](
        c,
        a,
        b,
        m,
        n,
        k,
        c.stride(0),
        a.stride(0),
        b.stride(0),
        BLOCK_M=t["block_m"],
        BLOCK_N=t["block_n"],
        BLOCK_K=t["block_k"],
        DOT_FP32=c.device.type != "cuda",
        num_warps=t["num_warps"],
        num_stages=t["num_stages"],
    )
    return c
