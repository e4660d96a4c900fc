"""linear_cross_entropy against cross_entropy on the full logits: loss and every gradient."""

from __future__ import annotations

import pytest
import torch

from automodel.kernels import cross_entropy, linear_cross_entropy
from harness.distributed import run_distributed

VOCAB, HIDDEN = 37, 24


def _problem(seed: int, bias: bool = False) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(seed)
    labels = torch.randint(0, VOCAB, (3, 9))
    labels[0, :4] = -100
    labels[2, -1] = -100
    return {
        "hidden": torch.randn(3, 9, HIDDEN),
        "weight": torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5,
        "bias": torch.randn(VOCAB) if bias else None,
        "labels": labels,
    }


def _full_logits_reference(problem: dict, **options) -> tuple[torch.Tensor, ...]:
    """(loss, count, grads...) of cross_entropy(hidden @ weight.T + bias) by autograd."""
    hidden = problem["hidden"].clone().requires_grad_(True)
    weight = problem["weight"].clone().requires_grad_(True)
    params = [hidden, weight]
    logits = hidden @ weight.T
    if problem["bias"] is not None:
        bias = problem["bias"].clone().requires_grad_(True)
        params.append(bias)
        logits = logits + bias
    loss, count = cross_entropy(logits, problem["labels"], backend="torch", **options)
    return (loss, count, *torch.autograd.grad(loss, params))


def _chunked(
    problem: dict,
    chunk_size: int | None,
    backend: str = "torch",
    weight_grad: str = "auto",
    **options,
) -> tuple[torch.Tensor, ...]:
    hidden = problem["hidden"].clone().requires_grad_(True)
    weight = problem["weight"].clone().requires_grad_(True)
    params = [hidden, weight]
    bias = None
    if problem["bias"] is not None:
        bias = problem["bias"].clone().requires_grad_(True)
        params.append(bias)
    loss, count = linear_cross_entropy(
        hidden,
        weight,
        problem["labels"],
        bias=bias,
        chunk_size=chunk_size,
        weight_grad=weight_grad,
        backend=backend,
        **options,
    )
    # A non-unit upstream gradient checks that backward scales the stored gradients.
    grads = torch.autograd.grad(loss * 3.0, params)
    return (loss, count, *(g / 3.0 for g in grads))


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"label_smoothing": 0.1},
    {"z_loss_weight": 1e-3},
    {"softcap": 4.0},
    {"label_smoothing": 0.05, "z_loss_weight": 1e-4, "softcap": 10.0, "reduction": "sum"},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    ("chunk_size", "weight_grad"),
    [(None, "chunks"), (5, "chunks"), (27, "chunks"), (None, "vocab_blocks"), (5, "vocab_blocks")],
)
def test_chunked_matches_full_logits(
    options: dict, chunk_size: int | None, weight_grad: str
) -> None:
    # vocab_blocks at chunk 5: blocks of 5 * 37 // 27 = 6 rows (a ragged last block of 1 row).
    problem = _problem(0, bias=bool(options))
    ref = _full_logits_reference(problem, **options)
    out = _chunked(problem, chunk_size, weight_grad=weight_grad, **options)
    assert torch.equal(out[1], ref[1])
    for got, want in zip(out[:1] + out[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_skips_grads() -> None:
    problem = _problem(1)
    hidden = problem["hidden"].clone().requires_grad_(True)
    loss, _ = linear_cross_entropy(hidden, problem["weight"], problem["labels"], chunk_size=4)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad, _full_logits_reference(problem)[2], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        loss_nograd, _ = linear_cross_entropy(hidden, problem["weight"], problem["labels"])
    torch.testing.assert_close(loss_nograd, loss, rtol=1e-6, atol=0)


def test_bf16_hidden_is_close_to_fp32_reference() -> None:
    problem = _problem(2)
    ref = _full_logits_reference(problem)
    loss, _ = linear_cross_entropy(
        problem["hidden"].bfloat16(), problem["weight"].bfloat16(), problem["labels"], chunk_size=8
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0], rtol=1e-2, atol=0)


def test_linear_cross_entropy_rejects_bad_inputs() -> None:
    problem = _problem(0)
    hidden, weight, labels = problem["hidden"], problem["weight"], problem["labels"]
    with pytest.raises(ValueError, match="reduction='none'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        linear_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="weight_grad='rows'"):
        linear_cross_entropy(hidden, weight, labels, weight_grad="rows")


def test_auto_weight_grad_takes_vocab_blocks_only_for_small_chunks_on_cuda() -> None:
    from automodel.kernels.linear_cross_entropy import _resolve_weight_grad

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _resolve_weight_grad("auto", cuda, 256, 8192) == "vocab_blocks"
    assert _resolve_weight_grad("auto", cuda, 512, 8192) == "chunks"  # the update is compute-bound
    assert _resolve_weight_grad("auto", cuda, 256, 256) == "chunks"  # one chunk: nothing to save
    assert _resolve_weight_grad("auto", cpu, 256, 8192) == "chunks"  # the reference
    assert _resolve_weight_grad("vocab_blocks", cpu, 512, 8192) == "vocab_blocks"


SHARDED_CASES = [
    {"label_smoothing": 0.1, "z_loss_weight": 1e-3},
    {"softcap": 3.0, "reduction": "sum"},
]


def _vocab_sharded_worker(rank: int, world_size: int) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    problem = _problem(3, bias=True)
    results = []
    for options in SHARDED_CASES:
        hidden = distribute_tensor(problem["hidden"], mesh, [Replicate()]).requires_grad_(True)
        weight = distribute_tensor(problem["weight"], mesh, [Shard(0)]).requires_grad_(True)
        bias = distribute_tensor(problem["bias"], mesh, [Shard(0)]).requires_grad_(True)
        loss, count = linear_cross_entropy(
            hidden, weight, problem["labels"], bias=bias, chunk_size=10, **options
        )
        loss.backward()
        # A sequence-sharded (sequence-parallel) hidden gives the same loss.
        hidden_sp = distribute_tensor(problem["hidden"], mesh, [Shard(1)])
        loss_sp, _ = linear_cross_entropy(
            hidden_sp, weight, problem["labels"], bias=bias, **options
        )
        results.append(
            {
                "loss": loss.detach(),
                "loss_sp": loss_sp.detach(),
                "count": count,
                "grad_hidden": hidden.grad.full_tensor(),
                "grad_weight": weight.grad.full_tensor(),
                "grad_bias": bias.grad.full_tensor(),
                "weight_grad_placements": str(weight.grad.placements),
            }
        )
    return results


@pytest.mark.slow
def test_vocab_sharded_dtensor_weight_on_two_ranks() -> None:
    # 37 rows over 2 ranks: an uneven split (19 + 18) exercises the vocab offsets.
    per_rank = run_distributed(_vocab_sharded_worker, world_size=2)
    for case, options in enumerate(SHARDED_CASES):
        ref = _full_logits_reference(_problem(3, bias=True), **options)
        for results in per_rank:
            result = results[case]
            assert torch.equal(result["count"], ref[1])
            assert result["weight_grad_placements"] == "(Shard(dim=0),)"
            torch.testing.assert_close(result["loss"], ref[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(result["loss_sp"], ref[0], rtol=1e-6, atol=1e-6)
            for key, want in zip(("grad_hidden", "grad_weight", "grad_bias"), ref[2:]):
                torch.testing.assert_close(result[key], want, rtol=1e-6, atol=1e-6)


def _triton_linear_ce_worker(rank: int, world_size: int) -> list:
    """The Triton chunk kernels against the full-logits reference, in a TRITON_INTERPRET=1 process.

    Both weight-gradient schedules; ``vocab_blocks`` with every loss option (the logsumexp the
    fused chunk kernel stores and the gradient kernel of each vocab block). ``_chunked``'s upstream
    gradient of 3 scales the gradients in backward; an upstream gradient of 1 leaves them as they
    are (the scale kernel's skip), checked on the first problem and on the kernel alone.
    """
    from automodel.kernels._triton.scale import scale_unless_one_

    names = ("loss", "count", "dhidden", "dweight", "dbias")
    pairs = []
    for weight_grad, options in (("chunks", OPTIONS[0]), ("vocab_blocks", OPTIONS[-1])):
        problem = _problem(4, bias=bool(options))
        ref = _full_logits_reference(problem, **options)
        out = _chunked(problem, 10, backend="triton", weight_grad=weight_grad, **options)
        pairs += [
            (f"{weight_grad} {options} {n}", g.detach(), r.detach())
            for n, g, r in zip(names, out, ref)
        ]
    problem = _problem(4)
    hidden = problem["hidden"].clone().requires_grad_(True)
    weight = problem["weight"].clone().requires_grad_(True)
    loss, _ = linear_cross_entropy(
        hidden, weight, problem["labels"], chunk_size=10, backend="triton"
    )
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref = _full_logits_reference(problem)
    pairs += [(f"upstream 1: {n}", g, r) for n, g, r in zip(("dhidden", "dweight"), grads, ref[2:])]
    x = torch.randn(5000).bfloat16()  # two 4096-element steps, the second ragged
    pairs.append(("scale by 1", scale_unless_one_(x.clone(), torch.tensor(1.0)), x))
    halved = scale_unless_one_(x.clone(), torch.tensor(0.5))
    pairs.append(("scale by 0.5", halved, x * 0.5))
    return pairs


@pytest.mark.slow
def test_triton_chunked_matches_full_logits(triton_pairs, assert_pairs_close) -> None:
    assert_pairs_close(triton_pairs, rtol=1e-5, atol=1e-6)


def test_second_backward_through_the_same_graph_is_refused() -> None:
    problem = _problem(5)
    hidden = problem["hidden"].clone().requires_grad_(True)
    loss, _ = linear_cross_entropy(hidden, problem["weight"], problem["labels"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.gpu
@pytest.mark.parametrize("weight_grad", ["chunks", "vocab_blocks"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss_weight": 1e-4}])
def test_gpu_linear_cross_entropy_bf16(assert_rel_close, options: dict, weight_grad: str) -> None:
    tokens, hidden_size, vocab = 4096, 2048, 128256
    hidden = torch.randn(tokens, hidden_size, device="cuda")
    weight = torch.randn(vocab, hidden_size, device="cuda") / hidden_size**0.5
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[:100] = -100
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref, ref_count = cross_entropy(h32 @ w32.T, labels, backend="torch", **options)
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    del h32, w32
    h16, w16 = hidden.bfloat16().requires_grad_(True), weight.bfloat16().requires_grad_(True)
    # auto backend: Triton on CUDA; 256-token chunks as at the benchmark.
    out, count = linear_cross_entropy(
        h16, w16, labels, chunk_size=256, weight_grad=weight_grad, **options
    )
    grads = torch.autograd.grad(out, (h16, w16))
    assert torch.equal(count, ref_count)
    assert_rel_close(out, ref, 1e-2, "loss")
    for name, got, want in zip(("dhidden", "dweight"), grads, ref_grads):
        assert_rel_close(got, want, 1e-2, name)
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out32, _ = linear_cross_entropy(
        h32, w32, labels, weight_grad=weight_grad, backend="triton", **options
    )
    grads32 = torch.autograd.grad(out32, (h32, w32))
    assert_rel_close(out32, ref, 1e-5, "fp32 loss")
    for name, got, want in zip(("fp32 dhidden", "fp32 dweight"), grads32, ref_grads):
        assert_rel_close(got, want, 1e-4, name)


@pytest.mark.gpu
def test_gpu_scale_unless_one() -> None:
    from automodel.kernels._triton.scale import scale_unless_one_

    x = torch.randn(4096, 4097, device="cuda", dtype=torch.bfloat16)
    for value in (1.0, 0.37, 3.0):
        scale = torch.tensor(value, device="cuda")
        want = (x.float() * value).bfloat16()
        assert torch.equal(scale_unless_one_(x.clone(), scale), want), value
