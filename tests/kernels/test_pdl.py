"""Programmatic dependent launch: off on the CPU, and on the GPU the same bits as plain launches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from automodel.kernels import add_rms_norm, apply_rotary, rms_norm, swiglu
from automodel.kernels._triton import launch


def test_pdl_is_off_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert launch.use_pdl(cpu) is False
    assert launch.pdl_kwargs(cpu) == {"USE_PDL": False}


def test_pdl_off_switch(monkeypatch) -> None:
    monkeypatch.setattr(launch, "PDL_ENABLED", False)
    assert launch.pdl_kwargs(torch.device("cuda", 0)) == {"USE_PDL": False}


def _chained_steps(op: str) -> Callable[[], list[torch.Tensor]]:
    """Returns a step that runs ``op`` twice in a row (the second reads the first's output), then
    the backward through both; every kernel of the chain reads what the one before it wrote."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)

    if op == "rope":
        q, k = randn(2, 1024, 32, 128).transpose(1, 2), randn(2, 1024, 8, 128).transpose(1, 2)
        angles = torch.rand(1, 1024, 64, device="cuda", generator=gen) * 6
        cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
        sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16()
        leaves = [q.requires_grad_(True), k.requires_grad_(True)]

        def forward() -> list[torch.Tensor]:
            once = apply_rotary(*leaves, cos, sin, backend="triton")
            return list(apply_rotary(*once, cos, sin, backend="triton"))
    elif op == "swiglu":
        leaves = [randn(4096, 2048).requires_grad_(True), randn(4096, 2048).requires_grad_(True)]

        def forward() -> list[torch.Tensor]:
            once = swiglu(*leaves, backend="triton")
            return [swiglu(once, leaves[1], backend="triton")]
    else:
        hidden = 4096
        weight = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).bfloat16()
        leaves = [randn(8192, hidden).requires_grad_(True), weight.requires_grad_(True)]
        residual = randn(8192, hidden).requires_grad_(True)
        if op == "add_rms_norm":
            leaves.append(residual)

        def forward() -> list[torch.Tensor]:
            x, w = leaves[0], leaves[1]
            if op == "rms_norm":
                return [rms_norm(rms_norm(x, w, backend="triton"), w, backend="triton")]
            normed, summed = add_rms_norm(x, leaves[2], w, backend="triton")
            return list(add_rms_norm(normed, summed, w, backend="triton"))

    upstream = [randn(*t.shape) for t in forward()]

    def step() -> list[torch.Tensor]:
        outs = forward()
        grads = torch.autograd.grad(outs, leaves, upstream)
        return [o.detach() for o in outs] + list(grads)

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "rope", "swiglu"])
def test_gpu_pdl_matches_plain_launches(op: str, monkeypatch) -> None:
    if not launch.use_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+ and Triton 3.4+")
    results = {}
    for enabled in (False, True):
        monkeypatch.setattr(launch, "PDL_ENABLED", enabled)
        step = _chained_steps(op)
        eager = step()
        step()  # the kernels are compiled: capture replays them as launched
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results[enabled] = (eager, [t.clone() for t in captured])
    for mode, index in (("eager", 0), ("CUDA graph", 1)):
        for i, (plain, pdl) in enumerate(zip(results[False][index], results[True][index])):
            assert torch.isfinite(plain).all() and plain.float().norm() > 0, (op, mode, i)
            assert torch.equal(plain, pdl), f"{op} {mode}: output {i} differs under PDL"


@pytest.mark.gpu
def test_gpu_kernels_under_torch_compile_match_eager(assert_rel_close) -> None:
    """torch.compile (inductor) of a block of the PDL-launched ops: the same values as eager."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    up = torch.randn(4096, 1024, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = (torch.rand(1024, device="cuda", generator=gen) + 0.5).bfloat16()
    q = torch.randn(2, 2048, 8, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    angles = torch.rand(1, 2048, 64, device="cuda", generator=gen) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()], -1).bfloat16()

    def block(x: torch.Tensor, up: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        normed, summed = add_rms_norm(x, up, w, backend="triton")
        hidden = swiglu(rms_norm(normed, w, backend="triton"), summed, backend="triton")
        rq, rk = apply_rotary(q.transpose(1, 2), q.transpose(1, 2), cos, sin, backend="triton")
        return hidden.float().sum() + (rq.float() * rk.float()).mean()

    results = []
    for fn in (block, torch.compile(block)):
        leaves = [t.clone().requires_grad_(True) for t in (x, up, w, q)]
        out = fn(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves)])
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        assert_rel_close(got.float(), want.float(), 1e-2, f"compiled vs eager, output {i}")
