"""rms_norm / add_rms_norm against transformers' LlamaRMSNorm and GemmaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from automodel.kernels import add_rms_norm, rms_norm


def _hf_norm(offset: float, hidden: int, eps: float, weight: torch.Tensor) -> torch.nn.Module:
    module = LlamaRMSNorm(hidden, eps=eps) if offset == 0.0 else GemmaRMSNorm(hidden, eps=eps)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_bitwise(offset: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, 48, dtype=dtype) * 3
    weight = torch.randn(48)
    module = _hf_norm(offset, 48, 1e-5, weight).to(dtype)
    x_ref = x.clone().requires_grad_(True)
    ref = module(x_ref)
    x_ours = x.clone().requires_grad_(True)
    w_ours = module.weight.detach().clone().requires_grad_(True)
    out = rms_norm(x_ours, w_ours, 1e-5, offset=offset, backend="torch")
    assert out.dtype == ref.dtype
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert torch.equal(x_ours.grad, x_ref.grad)
    assert torch.equal(w_ours.grad, module.weight.grad)


def test_rms_norm_fp32_weight_with_bf16_input_follows_llama_promotion() -> None:
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    weight = torch.randn(32)
    module = _hf_norm(0.0, 32, 1e-6, weight)
    assert torch.equal(rms_norm(x, weight, backend="torch"), module(x))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm_is_norm_of_the_sum(offset: float) -> None:
    torch.manual_seed(1)
    x, residual, weight = torch.randn(4, 40), torch.randn(4, 40), torch.randn(40)
    normed, summed = add_rms_norm(x, residual, weight, 1e-6, offset=offset, backend="torch")
    assert torch.equal(summed, x + residual)
    assert torch.equal(normed, _hf_norm(offset, 40, 1e-6, weight)(x + residual))


def test_norm_rejects_bad_inputs() -> None:
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(x, torch.ones(8))
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, torch.randn(2, 8), torch.ones(16))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        rms_norm(x, torch.ones(16), backend="triton")


def _triton_norm_worker(rank: int, world_size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Both backends on the same inputs, in a TRITON_INTERPRET=1 process."""
    from automodel.kernels._triton.norm import TUNING

    pairs = []
    # 15 rows on 4 programs (4, 4, 4, 3 rows): 2 rows per backward step leave a masked tail; with
    # prefetch the step after a program's last is loaded fully masked.
    # 40 columns in 16-column blocks of the partials' sum: its masked tail too; its 4 partial rows
    # in one step (reduce_rows=0) or two.
    # The forward in tiles of 1 or 2 rows (15 rows: the last tile of 2 is half masked).
    cases = (
        (0.0, 1, 1, 0, 32, 1),
        (1.0, 1, 1, 2, 16, 2),
        (0.0, 2, 1, 0, 16, 2),
        (1.0, 2, 0, 2, 32, 1),
    )
    for offset, rows_per_step, prefetch, reduce_rows, reduce_cols, fwd_rows in cases:
        TUNING.update(
            fwd_rows=fwd_rows,
            rows_per_step=rows_per_step,
            prefetch=prefetch,
            reduce_rows=reduce_rows,
            reduce_cols=reduce_cols,
        )
        torch.manual_seed(2)
        # 40 columns: not a power of two, so the masked tail of the block is exercised.
        x = torch.randn(5, 3, 40).requires_grad_(True)
        residual = torch.randn(5, 3, 40).requires_grad_(True)
        weight = torch.randn(40).requires_grad_(True)
        upstream = [torch.randn(5, 3, 40) for _ in range(3)]
        results = {}
        for backend in ("torch", "triton"):
            out = rms_norm(x, weight, 1e-5, offset=offset, backend=backend)
            normed, summed = add_rms_norm(x, residual, weight, 1e-5, offset=offset, backend=backend)
            grads = torch.autograd.grad((out, normed, summed), (x, residual, weight), upstream)
            results[backend] = (out, normed, summed, *grads)
        names = ("out", "normed", "summed", "dx", "dresidual", "dweight")
        for name, got, want in zip(names, results["triton"], results["torch"]):
            label = (
                f"offset={offset} case={rows_per_step, prefetch, reduce_rows, reduce_cols, fwd_rows} "
                f"{name}"
            )
            pairs.append((label, got.detach(), want.detach()))
    return pairs


@pytest.mark.slow
def test_triton_norms_match_reference(triton_pairs, assert_pairs_close) -> None:
    assert_pairs_close(triton_pairs, rtol=1e-5, atol=1e-5)


# The default backward geometry (prefetching, 32 warps per SM: 2 programs at hidden 4096, 4 at
# 2048) at both benchmark widths (Llama 3.1-8B's 4096, 3.2-1B's 2048) and the geometries
# benchmarks/kernels_bench.py sweeps.
GPU_CASES = [
    ({}, 4096),
    ({}, 2048),
    ({"prefetch": 0}, 4096),
    ({"programs_per_sm": 2}, 2048),
    ({"programs_per_sm": 1, "rows_per_step": 2}, 4096),
    ({"num_warps": 8}, 4096),
    ({"reduce_rows": 64, "reduce_cols": 32}, 4096),
    ({"fwd_rows": 2}, 2048),
    ({"fwd_rows": 4, "fwd_num_warps": 8}, 2048),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("tuning", "hidden"),
    GPU_CASES,
    ids=[("+".join(f"{k}={v}" for k, v in t.items()) or "default") + f"-{h}" for t, h in GPU_CASES],
)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gpu_triton_norms_bf16(
    assert_rel_close, offset: float, tuning: dict, hidden: int, monkeypatch
) -> None:
    from automodel.kernels._triton.norm import TUNING

    for key, value in tuning.items():
        monkeypatch.setitem(TUNING, key, value)
    x = torch.randn(4, 2048, hidden, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.rand(hidden, device="cuda") + 0.5
    upstream = torch.randn_like(x)
    inputs32 = [t.clone().requires_grad_(True) for t in (x, residual, weight)]
    ref, _ = add_rms_norm(*inputs32, backend="torch", offset=offset)
    ref_grads = torch.autograd.grad(ref, inputs32, upstream)
    inputs16 = [t.bfloat16().requires_grad_(True) for t in (x, residual, weight)]
    out, summed = add_rms_norm(*inputs16, offset=offset)  # auto: Triton on CUDA
    grads = torch.autograd.grad(out, inputs16, upstream.bfloat16())
    assert_rel_close(summed, x + residual, 1e-2, "summed")
    assert_rel_close(out, ref, 1e-2, "normed")
    for name, got, want in zip(("dx", "dresidual", "dweight"), grads, ref_grads):
        assert_rel_close(got, want, 1e-2, name)
    # rms_norm alone (no summed-stream gradient: the other backward kernel), bf16 and fp32.
    x16, w16 = x.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    x32, w32 = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref = rms_norm(x32, w32, offset=offset, backend="torch")
    ref_grads = torch.autograd.grad(ref, (x32, w32), upstream)
    out = rms_norm(x16, w16, offset=offset, backend="triton")
    grads = torch.autograd.grad(out, (x16, w16), upstream.bfloat16())
    assert_rel_close(out, ref, 1e-2, "rms_norm")
    for name, got, want in zip(("rms_norm dx", "rms_norm dweight"), grads, ref_grads):
        assert_rel_close(got, want, 1e-2, name)
    # fp32 through the Triton kernel: far under 1e-3.
    out32 = rms_norm(x, weight, offset=offset, backend="triton")
    assert_rel_close(out32, rms_norm(x, weight, offset=offset, backend="torch"), 1e-5, "fp32")


def test_ops_trace_without_graph_breaks_under_torch_compile() -> None:
    # backend resolution (and its once-per-op log) must not break a compiled model's graph
    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        normed, residual = add_rms_norm(x, x, w)
        return rms_norm(normed + residual, w, offset=1.0)

    x, w = torch.randn(2, 5, 16), torch.randn(16)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w), block(x, w), rtol=0, atol=0)
