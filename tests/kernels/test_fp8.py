"""convert_to_float8: which linears it converts, and a clean ImportError without torchao."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from automodel.kernels.fp8 import _float8_module_filter, convert_to_float8


def _model() -> nn.Module:
    return nn.ModuleDict(
        {
            "up_proj": nn.Linear(256, 512),
            "small": nn.Linear(256, 32),
            "odd": nn.Linear(256, 260),
            "lm_head": nn.Linear(256, 1024),
            "norm": nn.LayerNorm(256),
        }
    )


def test_filter_keeps_small_misaligned_and_named_layers_in_high_precision() -> None:
    keep = _float8_module_filter(filter_fqns=("lm_head",), min_features=64)
    chosen = {name for name, m in _model().named_modules() if name and keep(m, name)}
    assert chosen == {"up_proj"}
    keep_all = _float8_module_filter(min_features=16)
    assert {name for name, m in _model().named_modules() if name and keep_all(m, name)} == {
        "up_proj",
        "small",
        "lm_head",
    }


def test_without_torchao_the_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import torchao` raise ImportError, as on a slim install.
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match=r"automodel-kernels\[fp8\]"):
        convert_to_float8(_model())
    with pytest.raises(ValueError, match="recipe"):
        convert_to_float8(_model(), recipe="blockwise")


def test_with_torchao_only_eligible_linears_are_swapped() -> None:
    pytest.importorskip("torchao.float8", reason="torchao is not installed (the fp8 extra)")
    from torchao.float8.float8_linear import Float8Linear

    model = convert_to_float8(_model(), filter_fqns=("lm_head",), min_features=64)
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {"up_proj"}


@pytest.mark.gpu
def test_gpu_float8_training_step_stays_close_to_bf16() -> None:
    pytest.importorskip("torchao.float8", reason="torchao is not installed (the fp8 extra)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Linear(2048, 4096, bias=False), nn.GELU(), nn.Linear(4096, 2048, bias=False)
    )
    ref = ref.to("cuda", torch.bfloat16)
    fp8 = convert_to_float8(__import__("copy").deepcopy(ref))
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    outs = []
    for model in (ref, fp8):
        out = model(x)
        out.float().square().mean().backward()
        outs.append((out.float(), model[0].weight.grad.float()))
    for got, want in zip(outs[1], outs[0]):
        assert not torch.isnan(got).any()
        assert float((got - want).norm() / want.norm()) < 0.1
