"""Kernel patches for transformers models without an optimized implementation (day-0 support).

``patch_model`` walks a stock ``transformers`` model and swaps in automodel.kernels where it
recognizes a module type: RMSNorm-like norms, gated MLPs (separate or fused gate/up), fused MoE
experts (grouped GEMMs, ``automodel.core.moe``), the modeling file's ``apply_rotary_pos_emb``, the
causal-LM loss, and the packed-sequence check of its mask functions (skipped, with its host sync,
when the model makes its own positions). A candidate is patched only after
a numerical probe on random inputs shows the kernel reproduces the module's own forward (fp32,
tight tolerance), so an unfamiliar variant is left alone rather than silently changed. The model
stays a standard HF model; what was patched is logged and returned.
"""

from __future__ import annotations

import copy
import logging
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from automodel.core import _ops
from automodel.core._own_positions import skip_packed_check_for_own_positions

logger = logging.getLogger("automodel.core")

_ATOL = 1e-5


@dataclass
class PatchReport:
    """What ``patch_model`` changed: module class name -> count, plus patched functions."""

    modules: Counter[str] = field(default_factory=Counter)
    functions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mods = ", ".join(f"{n} x{c}" for n, c in sorted(self.modules.items())) or "none"
        funcs = ", ".join(self.functions) or "none"
        return (
            f"modules: {mods}; functions: {funcs}; left as is: {', '.join(self.skipped) or 'none'}"
        )


def patch_model(model: nn.Module) -> PatchReport:
    """Returns a report of the kernel patches applied, in place, to a transformers ``model``.

    Args:
        model: a ``transformers.PreTrainedModel`` (any architecture).

    Returns:
        A ``PatchReport``; it is also logged at INFO on the ``automodel.core`` logger and kept on
        the model as ``model._automodel_patches``.

    Example:
        >>> model = transformers.AutoModelForCausalLM.from_config(phi3_config)
        >>> print(patch_model(model))  # doctest: +SKIP
        modules: Phi3MLP x2, Phi3RMSNorm x5; functions: ...
    """
    report = PatchReport()
    verdicts: dict[tuple[type, str], bool] = {}
    for module in list(model.modules()):
        kind = _norm_kind(module) or _mlp_kind(module)
        if kind is None:
            continue
        key = (type(module), kind)
        if key not in verdicts:
            verdicts[key] = _probe(module, kind)
            if not verdicts[key]:
                report.skipped.append(type(module).__name__)
        if verdicts[key]:
            module.forward = types.MethodType(_FORWARDS[kind], module)  # type: ignore[method-assign]
            report.modules[type(module).__name__] += 1
    _patch_experts(model, report)
    _patch_rotary(model, report)
    report.functions += skip_packed_check_for_own_positions(model)
    if _is_causal_lm(model):
        model.loss_function = _causal_lm_loss  # type: ignore[assignment]
        report.functions.append("loss_function")
    model._automodel_patches = report  # type: ignore[assignment]
    logger.info("automodel: patched %s: %s", type(model).__name__, report)
    return report


# ----------------------------------------------------------------------------------- recognizers
def _norm_kind(module: nn.Module) -> str | None:
    if "RMSNorm" not in type(module).__name__:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or _eps(module) is None:
        return None
    return "rms_norm_gemma" if type(module).__name__.startswith("Gemma") else "rms_norm"


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _act_name(act: nn.Module) -> str | None:
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh", "NewGELUActivation"):
        return "gelu_tanh"
    if name in ("GELUActivation", "GELU") and getattr(act, "approximate", "none") == "none":
        return "gelu"
    return None


def _mlp_kind(module: nn.Module) -> str | None:
    names = set(dict(module.named_children()))
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)
    if not isinstance(act, nn.Module) or _act_name(act) is None:
        return None
    if {"gate_proj", "up_proj", "down_proj"} <= names:
        return "gated_mlp"
    if {"gate_up_proj", "down_proj"} <= names and isinstance(module.gate_up_proj, nn.Linear):
        return "fused_gated_mlp"
    return None


# -------------------------------------------------------------------------------- replacements
def _rms_norm_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return _ops.rms_norm(x, self.weight, _eps(self), offset=0.0)  # type: ignore[arg-type]


def _rms_norm_gemma_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return _ops.rms_norm(x, self.weight, _eps(self), offset=1.0)  # type: ignore[arg-type]


def _activation(self: Any) -> str:
    act = getattr(self, "act_fn", None) or self.activation_fn
    return _act_name(act)  # type: ignore[return-value, arg-type]


def _gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    hidden = _ops.gated_activation(self.gate_proj(x), self.up_proj(x), _activation(self))
    return self.down_proj(hidden)


def _fused_gated_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(_ops.gated_activation(gate, up, _activation(self)))


_FORWARDS = {
    "rms_norm": _rms_norm_forward,
    "rms_norm_gemma": _rms_norm_gemma_forward,
    "gated_mlp": _gated_mlp_forward,
    "fused_gated_mlp": _fused_gated_mlp_forward,
}


def _probe(module: nn.Module, kind: str) -> bool:
    """Returns True when the replacement reproduces ``module``'s forward on random fp32 inputs.

    Runs on the CPU whatever the ambient default device (``with torch.device("cuda")`` or
    ``"meta"`` around ``from_config``) and whatever the parameters are (meta, CUDA, DTensor).
    """
    gen = torch.Generator().manual_seed(0)
    try:
        probe: Any = _cpu_copy(module, gen)
    except Exception:  # state that cannot be copied (a process group, ...): leave it alone
        return False
    with torch.no_grad():
        width = (
            probe.weight.shape[0] if kind.startswith("rms") else next(probe.parameters()).shape[1]
        )
        x = torch.randn(2, 3, width, generator=gen, device="cpu")
        try:
            expected = probe(x)
            got = _FORWARDS[kind](probe, x)
        except Exception:  # a shape or signature we do not understand: leave it alone
            return False
    return bool(got.shape == expected.shape and torch.allclose(got, expected, atol=_ATOL, rtol=0))


def _cpu_copy(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Returns a deep copy of ``module`` whose parameters are fresh random fp32 CPU tensors.

    The real parameters are never copied (the deepcopy memo maps each one to its replacement), so
    meta, GPU or sharded (DTensor) weights cost nothing and are never read.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        fresh = torch.randn(tuple(p.shape), generator=gen, device="cpu") * 0.5
        memo[id(p)] = nn.Parameter(fresh, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.zeros(tuple(b.shape), device="cpu", dtype=torch.float32)
    return copy.deepcopy(module, memo)


def _patch_experts(model: nn.Module, report: PatchReport) -> None:
    """Runs fused MoE experts (Mixtral, Qwen3-MoE, ...) as grouped GEMMs once their class probes."""
    from automodel.core.moe.grouped_experts import (
        grouped_forward_matches,
        has_own_forward,
        is_experts_module,
        use_grouped_forward,
    )

    verdicts: dict[type, bool] = {}
    for module in model.modules():
        if not is_experts_module(module):
            continue
        cls = type(module)
        if has_own_forward(module):  # expert parallelism (or another library) owns it
            report.skipped.append(f"{cls.__name__} (forward already replaced)")
            continue
        if cls not in verdicts:
            verdicts[cls] = grouped_forward_matches(module, atol=_ATOL)
            if not verdicts[cls]:
                report.skipped.append(cls.__name__)
        if not verdicts[cls]:
            continue
        use_grouped_forward(module)
        report.modules[f"{cls.__name__} (grouped GEMM)"] += 1


def _patch_rotary(model: nn.Module, report: PatchReport) -> None:
    """Swaps ``apply_rotary_pos_emb`` in the model's modeling files when it is the standard one."""
    seen: set[str] = set()
    for module in model.modules():
        mod_name = type(module).__module__
        if mod_name in seen or not mod_name.startswith("transformers.models."):
            continue
        seen.add(mod_name)
        py_module = sys.modules.get(mod_name)
        original = getattr(py_module, "apply_rotary_pos_emb", None)
        if (
            original is None
            or getattr(original, "_automodel", False)
            or not _rotary_matches(original)
        ):
            continue

        def patched(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, _orig=original):  # type: ignore[no-untyped-def]
            if unsqueeze_dim != 1:
                return _orig(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
            return _ops.apply_rotary(q, k, cos, sin)

        patched._automodel = True  # type: ignore[attr-defined]
        setattr(py_module, "apply_rotary_pos_emb", patched)  # noqa: B010
        report.functions.append(f"{mod_name.rsplit('.', 1)[-1]}.apply_rotary_pos_emb")


def _rotary_matches(fn: Any) -> bool:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen, device="cpu")
    k = torch.randn(2, 2, 5, 8, generator=gen, device="cpu")
    cos = torch.randn(2, 5, 8, generator=gen, device="cpu")
    sin = torch.randn(2, 5, 8, generator=gen, device="cpu")
    try:
        eq, ek = fn(q, k, cos, sin)
    except Exception:
        return False
    gq, gk = _ops.apply_rotary(q, k, cos, sin)
    return bool(torch.allclose(eq, gq, atol=_ATOL) and torch.allclose(ek, gk, atol=_ATOL))


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on the kernels' fp32 cross-entropy (same semantics)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss, _ = _ops.cross_entropy(
        logits.reshape(-1, vocab_size),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
