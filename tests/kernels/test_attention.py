"""attention(): every backend against an explicit per-query masked softmax, forward and backward.

The reference here is written independently of the package's mask code: a float64 loop that, for
each query, lists the keys it may see and takes a softmax over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from automodel.kernels.attention import (
    attention,
    document_ids_from_cu_seqlens,
    document_ids_from_position_ids,
)
from automodel.kernels.attention.masks import MaskSpec, run_varlen, varlen_layout


@dataclass
class Case:
    name: str
    batch: int = 2
    hq: int = 4
    hkv: int = 2
    q_len: int = 12
    kv_len: int = 12
    head_dim: int = 8
    kwargs: dict[str, Any] = field(default_factory=dict)


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
# Row 0 right-padded, row 1 left-padded: under a causal mask row 1's first queries see no key.
PADDING = torch.tensor([[True] * 9 + [False] * 3, [False] * 3 + [True] * 9])

CASES = [
    Case("causal"),
    Case("bidirectional", kwargs=dict(causal=False)),
    Case("mha", hq=2, hkv=2),
    Case("window", kwargs=dict(window=5)),
    Case("documents", kwargs=dict(document_ids=DOCS)),
    Case("documents_window", kwargs=dict(document_ids=DOCS, window=3)),
    Case("documents_bidirectional", kwargs=dict(document_ids=DOCS, causal=False)),
    Case("padding", kwargs=dict(key_padding_mask=PADDING)),
    Case("padding_bidirectional", kwargs=dict(key_padding_mask=PADDING, causal=False)),
    Case("decode_chunk", q_len=3, kwargs=dict(window=5)),
    Case("decode_one", q_len=1),
    Case("decode_padding", q_len=4, kwargs=dict(key_padding_mask=PADDING)),
    Case("scale", kwargs=dict(scale=0.3)),
    Case("softcap", kwargs=dict(softcap=2.0, scale=1.0)),
    Case("softcap_documents_window", kwargs=dict(softcap=2.0, document_ids=DOCS, window=4)),
]


def _visible(case: Case, b: int, i: int) -> list[int]:
    """Keys that query ``i`` of row ``b`` may see, straight from the documented rule."""
    kw = case.kwargs
    pos = i + case.kv_len - case.q_len
    keys = []
    for j in range(case.kv_len):
        if kw.get("causal", True) and j > pos:
            continue
        if kw.get("window") is not None and j <= pos - kw["window"]:
            continue
        if (
            kw.get("document_ids") is not None
            and kw["document_ids"][b, pos] != kw["document_ids"][b, j]
        ):
            continue
        if kw.get("key_padding_mask") is not None and not kw["key_padding_mask"][b, j]:
            continue
        keys.append(j)
    return keys


def _loop_reference(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = case.kwargs.get("scale", case.head_dim**-0.5)
    softcap = case.kwargs.get("softcap")
    groups = case.hq // case.hkv
    rows = []
    for b in range(case.batch):
        heads = []
        for h in range(case.hq):
            outs = []
            for i in range(case.q_len):
                keys = _visible(case, b, i)
                if not keys:
                    outs.append(torch.zeros_like(v[b, 0, 0]))
                    continue
                kk, vv = k[b, h // groups, keys], v[b, h // groups, keys]
                s = (kk @ q[b, h, i]) * scale
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                outs.append(torch.softmax(s, dim=0) @ vv)
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def _inputs(
    case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[torch.Tensor]:
    shapes = [
        (case.batch, case.hq, case.q_len, case.head_dim),
        (case.batch, case.hkv, case.kv_len, case.head_dim),
        (case.batch, case.hkv, case.kv_len, case.head_dim),
    ]
    return [torch.randn(s, dtype=dtype, device=device).requires_grad_() for s in shapes]


def _fwd_bwd(fn: Any, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]  # type: ignore[misc]


def _close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float, what: str) -> None:
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        assert not torch.isnan(a).any(), f"{what}: NaN in {name}"
        torch.testing.assert_close(
            a.double(), b.double(), atol=atol, rtol=atol, msg=f"{what} {name}"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_eager_and_sdpa_match_the_loop_reference_forward_and_backward(case: Case) -> None:
    torch.manual_seed(0)
    inputs = _inputs(case)
    grad = torch.randn(case.batch, case.hq, case.q_len, case.head_dim)
    ref = _fwd_bwd(
        lambda q, k, v: _loop_reference(case, q, k, v), [t.double() for t in inputs], grad
    )
    eager = _fwd_bwd(
        lambda q, k, v: attention(q, k, v, backend="eager", **case.kwargs), inputs, grad
    )
    _close(eager, ref, 1e-5, f"{case.name} eager")
    auto = _fwd_bwd(lambda q, k, v: attention(q, k, v, **case.kwargs), inputs, grad)
    _close(auto, ref, 1e-5, f"{case.name} auto")
    if "softcap" not in case.kwargs:
        sdpa = _fwd_bwd(
            lambda q, k, v: attention(q, k, v, backend="sdpa", **case.kwargs), inputs, grad
        )
        _close(sdpa, ref, 1e-5, f"{case.name} sdpa")


@pytest.mark.slow
def test_flex_matches_the_reference_forward_on_cpu() -> None:
    # FlexAttention has no CPU backward in torch (the GPU test covers it), and uncompiled on CPU each
    # new mask costs seconds: one test, the cases that exercise every part of the mask rule.
    torch.manual_seed(0)
    names = {
        "causal",
        "padding",
        "decode_chunk",
        "softcap_documents_window",
        "documents_bidirectional",
    }
    for case in (c for c in CASES if c.name in names):
        q, k, v = (t.detach() for t in _inputs(case))
        want = attention(q, k, v, backend="eager", **case.kwargs)
        got = attention(q, k, v, backend="flex", **case.kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=case.name)


def test_cu_seqlens_equals_document_ids() -> None:
    torch.manual_seed(0)
    case = Case("packed", batch=1, q_len=10, kv_len=10)
    q, k, v = (t.detach() for t in _inputs(case))
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2]])
    assert torch.equal(document_ids_from_cu_seqlens(cu, 10), docs)
    assert torch.equal(
        document_ids_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])), docs
    )
    for backend in ("eager", "sdpa"):
        a = attention(q, k, v, cu_seqlens=cu, backend=backend)
        b = attention(q, k, v, document_ids=docs, backend=backend)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Packed documents see nothing of each other: each equals attention over the document alone.
    for start, end in [(0, 3), (3, 7), (7, 10)]:
        alone = attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        torch.testing.assert_close(a[:, :, start:end], alone, atol=1e-6, rtol=1e-6)


def test_mask_rule_matches_transformers_mask_functions() -> None:
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        padding_mask_function,
        sliding_window_causal_mask_function,
    )

    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    qi = torch.arange(12).view(1, 1, -1, 1)
    ki = torch.arange(12).view(1, 1, 1, -1)

    def grid(fn: Any) -> torch.Tensor:
        return torch.as_tensor(fn(b, h, qi, ki)).expand(2, 1, 12, 12)

    pairs = [
        (MaskSpec(q_len=12, kv_len=12), causal_mask_function),
        (MaskSpec(q_len=12, kv_len=12, window=5), sliding_window_causal_mask_function(5)),
        (
            MaskSpec(q_len=12, kv_len=12, document_ids=DOCS),
            and_masks(causal_mask_function, packed_sequence_mask_function(DOCS)),
        ),
        (
            MaskSpec(q_len=12, kv_len=12, window=3, key_padding_mask=PADDING),
            and_masks(sliding_window_causal_mask_function(3), padding_mask_function(PADDING)),
        ),
    ]
    for spec, hf_fn in pairs:
        assert torch.equal(spec.dense(torch.device("cpu")).expand(2, 1, 12, 12), grid(hf_fn))


def test_bad_arguments_raise_value_errors_that_name_the_fix() -> None:
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, k, softcap=5.0, backend="sdpa")
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, k, k, causal=False, window=3)
    with pytest.raises(ValueError, match="not both"):
        attention(
            q,
            k,
            k,
            document_ids=torch.zeros(1, 6, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 6]),
        )
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(1, 3, 6, 8), k, k)
    with pytest.raises(ValueError, match="document_ids must be"):
        attention(q, k, k, document_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q.requires_grad_(), k, k, backend="flex")
    with pytest.raises(ValueError, match="not supported"):
        attention(q, k, k, backend="flash")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn"])
def test_gpu_backends_in_bf16_against_an_fp64_reference(backend: str) -> None:
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    # 1000 queries: not a multiple of FlexAttention's 128-token blocks.
    batch, hq, hkv, seq, dim = 2, 16, 4, 1000, 128
    docs = torch.repeat_interleave(
        torch.arange(4, device="cuda"), torch.tensor([100, 300, 400, 200], device="cuda")
    )
    left_padded = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    left_padded[1, :200] = False  # row 1's first queries see no key at all: zeros, never NaN
    cases: list[dict[str, Any]] = [
        dict(),
        dict(window=256),
        dict(document_ids=docs.expand(batch, seq)),
        dict(key_padding_mask=left_padded, window=300),
    ]
    if backend != "sdpa":
        cases.append(dict(softcap=30.0, window=128))
    for kwargs in cases:
        q = torch.randn(
            batch, hq, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        k = torch.randn(
            batch, hkv, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        v = torch.randn(
            batch, hkv, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        grad = torch.randn(batch, hq, seq, dim, device="cuda", dtype=torch.bfloat16)
        out = attention(q, k, v, backend=backend, **kwargs)
        out.backward(grad)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, backend="eager", **kwargs)
        ref.backward(grad.double())
        for got, want in zip([out, q.grad, k.grad, v.grad], [ref, *(t.grad for t in leaves)]):
            assert _rel_err(got, want) < 1e-2, (backend, kwargs)


@pytest.mark.gpu
def test_gpu_auto_picks_flex_for_documents_and_sdpa_for_plain_causal() -> None:
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    docs = (torch.arange(256, device="cuda") // 100).unsqueeze(0)
    torch.testing.assert_close(
        attention(q, k, k, document_ids=docs), attention(q, k, k, document_ids=docs, backend="flex")
    )
    torch.testing.assert_close(attention(q, k, k), attention(q, k, k, backend="sdpa"))
    assert math.isfinite(float(attention(q, k, k, window=64).float().sum()))


@pytest.mark.gpu
def test_gpu_each_sdpa_kernel_matches_an_fp64_reference() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    batch, heads, seq, dim = 2, 16, 1024, 128
    for kernel in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        q, k, v = (
            torch.randn(
                batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
            )
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        with sdpa_kernel([kernel]):
            out = attention(q, k, v, backend="sdpa")  # plain causal: is_causal=True, no mask
            out.backward(grad)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attention(*leaves, backend="eager")
        ref.backward(grad.double())
        for got, want in zip([out, q.grad, k.grad, v.grad], [ref, *(t.grad for t in leaves)]):
            assert _rel_err(got, want) < 1e-2, kernel


@pytest.mark.gpu
def test_gpu_each_sdpa_kernel_with_a_boolean_mask_matches_an_fp64_reference() -> None:
    # Dense boolean masks (padding, windows, documents) go to cuDNN, efficient or math; every one
    # must agree with the reference, including rows that see no key (left padding).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    batch, hq, hkv, seq, dim = 2, 8, 2, 512, 128
    left_padded = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    left_padded[1, :100] = False
    docs = (torch.arange(seq, device="cuda") // 160).expand(batch, seq)
    cases: list[dict[str, Any]] = [
        dict(window=200),
        dict(document_ids=docs),
        dict(key_padding_mask=left_padded, window=150),
    ]
    for kernel in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        for kwargs in cases:
            q = torch.randn(batch, hq, seq, dim, device="cuda", dtype=torch.bfloat16)
            k, v = (
                torch.randn(batch, hkv, seq, dim, device="cuda", dtype=torch.bfloat16)
                for _ in range(2)
            )
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            grad = torch.randn_like(q)
            with sdpa_kernel([kernel]):
                out = attention(q, k, v, backend="sdpa", **kwargs)
                out.backward(grad)
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = attention(*leaves, backend="eager", **kwargs)
            ref.backward(grad.double())
            for got, want in zip([out, q.grad, k.grad, v.grad], [ref, *(t.grad for t in leaves)]):
                assert _rel_err(got, want) < 1e-2, (kernel, list(kwargs))


@pytest.mark.gpu
def test_gpu_flex_past_its_compile_budget_runs_sdpa_not_unfused_flex(monkeypatch, caplog) -> None:
    from automodel.kernels.attention import flex

    torch._dynamo.reset()  # a known number of compiled variants: none
    monkeypatch.setattr(flex, "_MAX_COMPILED_VARIANTS", 1)
    try:
        for seq in (256, 200):  # the second length would need a second compiled variant
            q = torch.randn(1, 8, seq, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 2, seq, 64, device="cuda", dtype=torch.bfloat16)
            docs = (torch.arange(seq, device="cuda") // 90).unsqueeze(0)
            got = attention(q, k, k, document_ids=docs, backend="flex")
            want = attention(q, k, k, document_ids=docs, backend="eager")
            assert _rel_err(got, want) < 1e-2, seq
        assert "this call runs SDPA with a dense mask" in caplog.text
    finally:
        torch._dynamo.reset()


def test_varlen_layout_splits_rows_and_documents_and_drops_padding() -> None:
    # Row 0: documents 0 (3 tokens) and 1 (2 tokens) then one padding token; row 1: one document
    # whose first token is padding. Sequences never continue across rows.
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [5, 5, 5, 5, 5, 5]])
    real = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    spec = MaskSpec(6, 6, document_ids=docs, key_padding_mask=real)
    keep, cu, max_len = varlen_layout(spec, 2, 6, torch.device("cpu"))
    assert keep.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 10]
    assert max_len == 5
    # Without documents each row is one sequence.
    keep, cu, max_len = varlen_layout(
        MaskSpec(6, 6, key_padding_mask=real), 2, 6, torch.device("cpu")
    )
    assert cu.tolist() == [0, 5, 10] and max_len == 5


def test_run_varlen_gathers_the_kept_tokens_and_zeroes_padding() -> None:
    docs = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3]])
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    spec = MaskSpec(4, 4, document_ids=docs, key_padding_mask=real)
    q, k = torch.randn(2, 4, 4, 8), torch.randn(2, 2, 4, 8)
    seen = {}

    def kernel(
        fq: torch.Tensor, fk: torch.Tensor, fv: torch.Tensor, cu: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        seen.update(shapes=(fq.shape, fk.shape), cu=cu.tolist(), max_len=max_len)
        return fq * 2  # an output per kept query token

    out = run_varlen(q, k, k, spec, kernel)
    assert seen == {"shapes": ((7, 4, 8), (7, 2, 8)), "cu": [0, 2, 3, 7], "max_len": 4}
    want = q * 2
    want[0, :, 3] = 0  # the padding position outputs zeros
    torch.testing.assert_close(out, want, rtol=0, atol=0)
