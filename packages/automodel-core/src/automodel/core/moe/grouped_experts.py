"""Grouped-GEMM forward for transformers' fused MoE expert modules (Mixtral, Qwen3-MoE, ...).

transformers 5 holds the experts of a MoE block as one module with 3D parameters
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` and a forward
``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` that loops over the experts
hit. This module swaps that forward for: permute the token copies by expert, one grouped GEMM for
gate/up, the fused gated activation, one grouped GEMM for down, and a weighted unpermute — no Python
loop over experts on the GPU. Parameters, their names and the on-disk layout stay untouched, so
checkpoints, ``save_pretrained``, PEFT and expert parallelism see the same module.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import torch
from torch import nn

from automodel.kernels import grouped_mm, permute, swiglu, unpermute
from automodel.kernels.moe import swiglu_packed


def is_experts_module(module: nn.Module) -> bool:
    """Returns True for a fused experts module: 3D ``gate_up_proj`` and ``down_proj`` parameters."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and not hasattr(
            module, "gate_up_proj_bias"
        )  # biased experts (gpt-oss) keep their own forward
    )


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _grouped_forward(
    self: Any,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    num_experts = int(self.gate_up_proj.shape[0])
    permuted, row_map, tokens_per_expert = permute(hidden_states, top_k_index, num_experts)
    out = _expert_mlp(
        self, permuted, tokens_per_expert, self.gate_up_proj, self.down_proj, _active_lora(self)
    )
    # Kept on device (no sync) for moe_load_stats; detached so it never holds the graph.
    self._automodel_tokens_per_expert = tokens_per_expert.detach()
    # The weighted sum runs in fp32 inside unpermute; the weights keep their own dtype.
    return unpermute(out, row_map, top_k_weights).to(hidden_states.dtype)


def _expert_mlp(
    self: Any,
    rows: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: Any = None,
) -> torch.Tensor:
    """Returns ``down_e(act(gate_e x) * up_e x)`` for ``rows`` grouped by expert (no routing weights)."""
    gate_up = grouped_mm(rows, gate_up_proj.transpose(1, 2), tokens_per_expert)
    if lora is None and _is_silu(self.act_fn):  # one pass over the packed [N, 2I] output
        return grouped_mm(swiglu_packed(gate_up), down_proj.transpose(1, 2), tokens_per_expert)
    gate, up = gate_up.chunk(2, dim=-1)
    if lora is not None:  # automodel.core.peft's per-expert LoRA: two more grouped GEMMs each
        if "gate" in lora.projections:
            gate = gate + lora.delta("gate", rows, tokens_per_expert)
        if "up" in lora.projections:
            up = up + lora.delta("up", rows, tokens_per_expert)
    act = swiglu(gate, up) if _is_silu(self.act_fn) else self.act_fn(gate) * up
    out = grouped_mm(act, down_proj.transpose(1, 2), tokens_per_expert)
    if lora is not None and "down" in lora.projections:
        out = out + lora.delta("down", act, tokens_per_expert)
    return out


def _local_expert_mlp(
    self: Any,
    rows: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The hook ``grouped_expert_mlp`` installed on patched experts, for expert parallelism.

    Returns ``[N, H]``: each local expert's MLP on its consecutive block of ``rows`` (``[N, H]``,
    counts ``tokens_per_expert`` ``[E_local]``) with the given local weight shards
    (``[E_local, 2I, H]``, ``[E_local, H, I]``), as grouped GEMMs. An all-to-all forward (which
    cannot import automodel.core) calls ``module.grouped_expert_mlp(...)`` when present instead
    of its own loop over experts. No LoRA: expert adapters are not sharded with the experts.
    """
    return _expert_mlp(self, rows, tokens_per_expert, gate_up_proj, down_proj)


def _permute_tokens(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hook ``permute_tokens`` installed on patched experts, for expert parallelism.

    Returns ``(rows [T*k, H], row_map [T*k], counts [num_groups])``: the token copies grouped by
    expert in expert order, as :func:`automodel.kernels.permute` makes them (a gather whose
    backward is a gather-sum: no sort, no atomics). ``num_groups`` may exceed the number of
    experts (expert parallelism counts a router's dropped slots, index ``E``, as one more group,
    which sorts last).
    """
    return permute(hidden_states, top_k_index, num_groups)


def _unpermute_tokens(
    self: Any, rows: torch.Tensor, row_map: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The hook ``unpermute_tokens`` installed on patched experts, for expert parallelism.

    Returns ``[T, H]`` in ``rows``' dtype: each token's ``k`` expert outputs (``rows`` in
    :func:`_permute_tokens`' order) weighted and summed in fp32, in a fixed order (deterministic).
    """
    return unpermute(rows, row_map, top_k_weights)


def has_own_forward(module: nn.Module) -> bool:
    """Returns True when ``module``'s forward was replaced on the instance by someone else.

    Expert parallelism (``automodel.parallel.apply_expert_parallel``) installs its all-to-all
    forward that way; the grouped forward must not silently undo it.
    """
    return "forward" in vars(module) and not getattr(module, "_automodel_grouped", False)


def use_grouped_forward(module: nn.Module) -> bool:
    """Returns True when ``module``'s forward was switched to the grouped GEMMs now (False: already).

    No check of the math: :func:`grouped_forward_matches` is the probe for unfamiliar classes.

    Raises:
        ValueError: ``module`` is not a fused experts module, or its forward was already replaced
            on the instance (expert parallelism): group the experts before parallelizing.
    """
    if not is_experts_module(module):
        raise ValueError(
            f"use_grouped_forward: {type(module).__name__} is not a fused experts module; expected "
            "3D gate_up_proj [E, 2I, H] and down_proj [E, H, I] parameters without biases"
        )
    if getattr(module, "_automodel_grouped", False):
        return False
    if has_own_forward(module):
        raise ValueError(
            f"use_grouped_forward: {type(module).__name__} already has an instance forward "
            f"({getattr(module.forward, '__qualname__', type(module.forward).__name__)}), e.g. "
            "from expert parallelism; expected transformers' class forward. Fix: patch the "
            "experts before automodel.parallel.apply_expert_parallel"
        )
    module.forward = types.MethodType(_grouped_forward, module)  # type: ignore[method-assign]
    setattr(module, "grouped_expert_mlp", types.MethodType(_local_expert_mlp, module))  # noqa: B010
    setattr(module, "permute_tokens", types.MethodType(_permute_tokens, module))  # noqa: B010
    setattr(module, "unpermute_tokens", types.MethodType(_unpermute_tokens, module))  # noqa: B010
    setattr(module, "_automodel_grouped", True)  # noqa: B010
    return True


def grouped_forward_matches(module: nn.Module, *, max_experts: int = 4, atol: float = 1e-5) -> bool:
    """Returns True when the grouped forward reproduces the class's own forward (fp32, CPU probe).

    The probe is a shallow copy of ``module`` holding fresh random fp32 CPU weights for at most
    ``max_experts`` experts (the real weights are neither read nor copied, so meta, sharded or
    30B-sized modules cost a few MB), run on random tokens with random top-k routing through the
    class's undecorated forward (transformers' per-expert loop, whatever experts implementation
    the config selects) and through the grouped path. A layout the grouped path does not
    implement (interleaved or transposed weights, a post-expert norm, ...) fails the probe.
    """
    if not is_experts_module(module):
        return False
    weights_3d: Any = module.gate_up_proj
    num_experts = min(int(weights_3d.shape[0]), max_experts)
    _, two_inter, hidden = weights_3d.shape
    gen = torch.Generator().manual_seed(0)
    try:
        probe: Any = copy.copy(module)
    except Exception:  # a wrapper class that cannot be copied (FSDP2's): not ours to judge
        return False
    probe._parameters = dict(module._parameters)
    probe._modules = {k: v for k, v in module._modules.items() if k != "lora"}  # no adapter
    probe._parameters["gate_up_proj"] = nn.Parameter(
        torch.randn(num_experts, int(two_inter), int(hidden), generator=gen, device="cpu") * 0.1
    )
    probe._parameters["down_proj"] = nn.Parameter(
        torch.randn(num_experts, int(hidden), int(two_inter) // 2, generator=gen, device="cpu")
        * 0.1
    )
    if hasattr(probe, "num_experts"):
        probe.num_experts = num_experts
    top_k = min(2, num_experts)
    tokens = 6
    x = torch.randn(tokens, int(hidden), generator=gen, device="cpu")
    index = torch.rand(tokens, num_experts, generator=gen, device="cpu").argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=gen, device="cpu").softmax(dim=-1)
    reference = type(module).forward
    reference = getattr(reference, "__wrapped__", reference)  # transformers' dispatch decorator
    try:
        with torch.no_grad():
            expected = reference(probe, x, index, weights)
            got = _grouped_forward(probe, x, index, weights)
    except Exception:  # a signature or layout we do not understand: leave it alone
        return False
    return bool(
        isinstance(expected, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, atol=atol, rtol=0)
    )


def _active_lora(module: Any) -> Any:
    """Returns the unmerged ``ExpertsLora`` child of an experts module (``automodel.core.peft``)."""
    lora = module._modules.get("lora")
    return None if lora is None or getattr(lora, "merged", False) else lora


def patch_moe_experts(model: nn.Module) -> list[str]:
    """Returns the FQNs of the expert modules whose forward now runs as grouped GEMMs.

    Recognizes modules by structure (see :func:`is_experts_module`), so MoE families transformers adds
    later work too. Idempotent. The math equals the per-expert loop (same products, summed in a
    fixed order); ``automodel.kernels.grouped_mm`` uses ``torch._grouped_mm`` on Hopper GPUs.
    Experts whose forward another library replaced on the instance (expert parallelism's
    all-to-all) are left alone and not listed. ``automodel.core.patching.patch_model`` (the
    ``AutoModelFor*`` fallback) does the same per module after :func:`grouped_forward_matches`
    accepted its class.

    Example:
        >>> model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_path)
        >>> patch_moe_experts(model)
        ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
    """
    patched = []
    for name, module in model.named_modules():
        if is_experts_module(module) and not has_own_forward(module):
            use_grouped_forward(module)
            patched.append(name)
    return patched
