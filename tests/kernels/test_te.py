"""Transformer Engine backend: import errors that say what is missing, what gets swapped, and (on a
GPU with TE installed) parity of the swapped model and of TE's attention with the references."""

from __future__ import annotations

import copy
import importlib.abc
import sys

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from automodel.kernels import attention, convert_to_te, te_available, te_fp8_autocast
from automodel.kernels.te import import_te, te_conversion_plan
from harness.models import VOCAB_SIZE, build_tiny_model


class _FailingImport(importlib.abc.MetaPathFinder):
    """Makes ``import transformer_engine`` raise ``error``, as a broken install does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformer_engine":
            raise self.error
        return None


@pytest.fixture
def broken_te(monkeypatch):
    """Installs a failing import of transformer_engine (a CUDA install cannot be broken here)."""

    def install(error: Exception) -> None:
        for name in [n for n in sys.modules if n.split(".")[0] == "transformer_engine"]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "meta_path", [_FailingImport(error), *sys.meta_path])

    return install


@pytest.mark.parametrize(
    "error",
    [
        OSError("libcudart.so.12: cannot open shared object file: No such file or directory"),
        RuntimeError("CUDA driver version is insufficient for CUDA runtime version"),
        ImportError("No module named 'transformer_engine_torch'"),
    ],
    ids=["OSError", "RuntimeError", "ImportError"],
)
def test_every_import_failure_becomes_an_import_error_naming_it(broken_te, error) -> None:
    broken_te(error)
    with pytest.raises(ImportError) as info:
        import_te()
    message = str(info.value)
    assert type(error).__name__ in message and str(error) in message
    assert "automodel-kernels[te]" in message
    assert info.value.__cause__ is error
    assert te_available() is False


def test_without_te_the_public_entry_points_raise_import_error(broken_te) -> None:
    broken_te(ImportError("No module named 'transformer_engine'"))
    model = nn.Sequential(nn.Linear(2048, 2048))
    with pytest.raises(ImportError, match="Transformer Engine cannot be used here"):
        convert_to_te(model)
    assert isinstance(model[0], nn.Linear)  # nothing was touched
    with pytest.raises(ImportError, match="Transformer Engine"), te_fp8_autocast():
        pass


def test_bad_arguments_are_named_before_te_is_needed() -> None:
    with pytest.raises(ValueError, match="recipe='fp4'"), te_fp8_autocast(recipe="fp4"):
        pass
    with pytest.raises(ValueError, match=r"rms_norms\[LlamaRMSNorm\] = 0.5"):
        convert_to_te(nn.Linear(16, 16), rms_norms={LlamaRMSNorm: 0.5})
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, softcap=30.0, backend="te")
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.ones(1, 4, dtype=torch.bool), backend="te")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, k, v, backend="te")


def _tiny_llama() -> LlamaForCausalLM:
    return build_tiny_model("llama")


def test_plan_swaps_every_projection_and_named_norm_but_the_filtered() -> None:
    model = _tiny_llama()
    plan = dict(
        te_conversion_plan(
            model, filter_fqns=("lm_head",), min_features=16, rms_norms={LlamaRMSNorm: 0.0}
        )
    )
    layers = [f"model.layers.{i}" for i in range(2)]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    want_linears = {f"{lay}.self_attn.{p}" for lay in layers for p in projections}
    want_linears |= {
        f"{lay}.mlp.{p}" for lay in layers for p in ("gate_proj", "up_proj", "down_proj")
    }
    want_norms = {
        f"{lay}.{n}" for lay in layers for n in ("input_layernorm", "post_attention_layernorm")
    }
    want_norms.add("model.norm")
    assert {n for n, kind in plan.items() if kind == "linear"} == want_linears
    assert {n for n, kind in plan.items() if kind == "rms_norm"} == want_norms
    # Without rms_norms only linears; with min_features above the width, none.
    assert "rms_norm" not in dict(te_conversion_plan(model, min_features=16)).values()
    assert te_conversion_plan(model, min_features=4096) == []


def _require_te() -> None:
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine runs on CUDA GPUs only")
    try:
        import_te()
    except ImportError as err:
        pytest.skip(str(err))


@pytest.mark.gpu
def test_gpu_te_model_matches_the_original_in_bf16(assert_rel_close) -> None:
    _require_te()
    ref = _tiny_llama().cuda().bfloat16()
    te_model = convert_to_te(
        copy.deepcopy(ref), filter_fqns=("lm_head",), min_features=16, rms_norms={LlamaRMSNorm: 0.0}
    )
    assert type(te_model.model.layers[0].self_attn.q_proj).__module__.startswith(
        "transformer_engine"
    )
    ids = torch.randint(0, VOCAB_SIZE, (2, 32), device="cuda")
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = te_model(ids).logits.float()
    assert_rel_close(got, want, 2e-2, "TE linears + RMSNorm logits")
    loss = te_model(ids, labels=ids).loss
    loss.backward()
    grad = te_model.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.norm() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["causal", "window", "documents", "not_causal"])
def test_gpu_te_attention_matches_eager(assert_rel_close, pattern: str) -> None:
    _require_te()
    torch.manual_seed(0)
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kwargs: dict = {"causal": pattern != "not_causal"}
    if pattern == "window":
        kwargs["window"] = 64
    if pattern == "documents":
        kwargs["document_ids"] = (torch.arange(256, device="cuda") // 100).expand(2, -1)
    want = attention(q.float(), k.float(), v.float(), backend="eager", **kwargs)
    got = attention(q, k, v, backend="te", **kwargs)
    assert_rel_close(got.float(), want, 1e-2, f"te attention, {pattern}")
