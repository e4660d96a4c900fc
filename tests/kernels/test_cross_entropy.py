"""cross_entropy against torch.nn.CrossEntropyLoss (and an explicit z-loss / softcap formula)."""

from __future__ import annotations

import pytest
import torch

from automodel.kernels import cross_entropy
from automodel.kernels.cross_entropy import ce_loss_and_grad


def _inputs(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    logits = (torch.randn(3, 7, 41) * 3).to(dtype)
    labels = torch.randint(0, 41, (3, 7))
    labels[0, :3] = -100
    labels[2, 5] = -100
    return logits, labels


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_loss(label_smoothing: float, reduction: str) -> None:
    logits, labels = _inputs(0)
    ref_logits = logits.clone().requires_grad_(True)
    ref = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction=reduction)(
        ref_logits.view(-1, 41), labels.view(-1)
    )
    ours_logits = logits.clone().requires_grad_(True)
    loss, count = cross_entropy(
        ours_logits, labels, label_smoothing=label_smoothing, reduction=reduction, backend="torch"
    )
    assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == 17
    if reduction == "none":
        assert torch.equal(loss.view(-1), ref)
    else:
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    grad = torch.randn_like(loss)
    ref.backward(grad.view_as(ref))
    loss.backward(grad)
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)


def test_cross_entropy_bf16_logits_use_fp32_math() -> None:
    logits, labels = _inputs(1, torch.bfloat16)
    loss, _ = cross_entropy(logits, labels, backend="torch")
    ref = torch.nn.functional.cross_entropy(logits.float().view(-1, 41), labels.view(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_z_loss_and_softcap_follow_their_formula() -> None:
    logits, labels = _inputs(2)
    z = 30.0 * torch.tanh(logits / 30.0)
    valid = labels != -100
    lse = torch.logsumexp(z, -1)
    nll = torch.nn.functional.cross_entropy(z.view(-1, 41), labels.view(-1), reduction="none")
    ref = (nll + 1e-3 * torch.where(valid.view(-1), lse.view(-1) ** 2, 0.0)).sum()
    loss, _ = cross_entropy(
        logits, labels, z_loss_weight=1e-3, softcap=30.0, reduction="sum", backend="torch"
    )
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_all_ignored_mean_is_zero_not_nan() -> None:
    logits = torch.randn(4, 9, requires_grad=True)
    loss, count = cross_entropy(logits, torch.full((4,), -100), backend="torch")
    loss.backward()
    assert int(count) == 0 and loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(4, 9))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.2},
        {"z_loss_weight": 1e-2},
        {"softcap": 5.0},
        {"label_smoothing": 0.1, "z_loss_weight": 1e-3, "softcap": 20.0},
    ],
)
def test_closed_form_loss_and_grad_match_autograd(options: dict) -> None:
    """ce_loss_and_grad (used by the chunked and fused paths) against the autograd reference."""
    logits, labels = _inputs(3)
    flat, flat_labels = logits.view(-1, 41).requires_grad_(True), labels.view(-1)
    ref, _ = cross_entropy(flat, flat_labels, reduction="none", backend="torch", **options)
    ref_grad = torch.autograd.grad(ref.sum(), flat)[0]
    loss, grad = ce_loss_and_grad(
        flat.detach(),
        flat_labels,
        ignore_index=-100,
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss_weight=options.get("z_loss_weight", 0.0),
        softcap=options.get("softcap"),
        want_grad=True,
    )
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_cross_entropy_rejects_bad_inputs() -> None:
    logits, labels = _inputs(0)
    with pytest.raises(ValueError, match="labels must have shape"):
        cross_entropy(logits, labels[:, 1:])
    with pytest.raises(ValueError, match="reduction='avg'"):
        cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="integer tensor"):
        cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, labels, label_smoothing=1.0)


TRITON_OPTIONS = [
    {},
    {"reduction": "none", "softcap": 3.0},
    {"label_smoothing": 0.1, "z_loss_weight": 1e-3, "softcap": 20.0, "reduction": "sum"},
]


def _triton_cross_entropy_worker(rank: int, world_size: int) -> list:
    """Both backends on the same inputs, in a TRITON_INTERPRET=1 process."""
    logits, labels = _inputs(4)
    logits.requires_grad_(True)
    pairs = []
    for options in TRITON_OPTIONS:
        ref, ref_count = cross_entropy(logits, labels, backend="torch", **options)
        out, count = cross_entropy(logits, labels, backend="triton", **options)
        upstream = torch.rand_like(ref) + 0.5
        (ref_grad,) = torch.autograd.grad(ref, logits, upstream)
        (grad,) = torch.autograd.grad(out, logits, upstream)
        pairs += [
            (f"{options} count", count, ref_count),
            (f"{options} loss", out.detach(), ref.detach()),
            (f"{options} dlogits", grad, ref_grad),
        ]
    # Labels that are a strided view (every other element of a longer tensor).
    strided = torch.randint(0, 41, (42,))[::2]
    flat = logits.detach().view(21, 41)
    pairs.append(
        (
            "strided labels",
            cross_entropy(flat, strided, backend="triton")[0],
            cross_entropy(flat, strided, backend="torch")[0],
        )
    )
    return pairs


@pytest.mark.slow
def test_triton_cross_entropy_matches_reference(triton_pairs, assert_pairs_close) -> None:
    assert_pairs_close(triton_pairs, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("options", TRITON_OPTIONS)
def test_gpu_triton_cross_entropy_bf16(assert_rel_close, options: dict) -> None:
    logits = torch.randn(4096, 128256, device="cuda") * 4
    labels = torch.randint(0, 128256, (4096,), device="cuda")
    labels[::7] = -100
    logits32 = logits.clone().requires_grad_(True)
    ref, ref_count = cross_entropy(logits32, labels, backend="torch", **options)
    upstream = torch.rand_like(ref) + 0.5
    (ref_grad,) = torch.autograd.grad(ref, logits32, upstream)
    del logits32
    logits16 = logits.bfloat16().requires_grad_(True)
    out, count = cross_entropy(logits16, labels, **options)  # auto: Triton on CUDA
    (grad,) = torch.autograd.grad(out, logits16, upstream)
    assert torch.equal(count, ref_count) and out.dtype == torch.float32
    assert_rel_close(out, ref, 1e-2, "loss")
    assert_rel_close(grad, ref_grad, 1e-2, "dlogits")
    out32, _ = cross_entropy(logits, labels, backend="triton", **options)
    assert_rel_close(out32, ref, 1e-5, "fp32 loss")
