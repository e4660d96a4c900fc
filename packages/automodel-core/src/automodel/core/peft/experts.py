"""LoRA on fused MoE experts: one low-rank adapter per expert and projection, run as grouped GEMMs.

transformers 5 keeps a MoE layer's experts as one module with 3D weights ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (see ``automodel.core.moe``). ``ExpertsLora`` holds,
for each adapted projection (``gate``, ``up``, ``down``), factors ``A [E, r, in]`` and
``B [E, out, r]``: expert ``e`` computes ``W_e x + scaling * B_e (A_e x)``, exactly what peft's
``LoraLinear`` computes on the per-expert ``nn.Linear`` modules of the Hub's checkpoint layout
(``...experts.{e}.w1`` for Mixtral, ``...experts.{e}.gate_proj`` for Qwen-MoE). The adapter lives
as a child ``lora`` of the experts module, whose grouped forward (``automodel.core.moe``) adds the
low-rank terms with two more grouped GEMMs per projection; the expert weights stay untouched.

On disk (``save_adapter``) each expert's ``A_e``/``B_e`` are peft's ``lora_A.weight`` /
``lora_B.weight`` of that per-expert module, which ``peft.PeftModel.from_pretrained`` (0.18+) loads
into transformers 5's fused experts through its MoE weight conversion.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from automodel.core.moe.grouped_experts import has_own_forward, use_grouped_forward
from automodel.core.moe.state_dict_adapter import MoEKeyMap
from automodel.core.peft.lora_linear import _assign_full
from automodel.kernels import grouped_mm

PROJECTIONS = ("gate", "up", "down")


class ExpertsLora(nn.Module):
    """Per-expert LoRA factors of one experts module: ``lora_A_{proj} [E, r, in]``, ``lora_B_{proj} [E, out, r]``.

    Args:
        experts: the fused experts module (3D ``gate_up_proj`` / ``down_proj``).
        projections: which of ``"gate"``, ``"up"``, ``"down"`` get an adapter.
        rank, alpha, use_rslora, init: as ``LoraConfig``.

    Example:
        >>> lora = ExpertsLora(experts, ("gate", "up", "down"), rank=8, alpha=16)  # doctest: +SKIP
        >>> lora.lora_A_gate.shape  # [E, r, hidden]  # doctest: +SKIP
    """

    def __init__(
        self,
        experts: nn.Module,
        projections: tuple[str, ...],
        *,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        bad = [p for p in projections if p not in PROJECTIONS]
        if bad or not projections:
            raise ValueError(
                f"ExpertsLora: projections={projections!r}; expected a non-empty subset of "
                f"{PROJECTIONS}"
            )
        gate_up: torch.Tensor = experts.gate_up_proj  # type: ignore[assignment]
        num_experts, two_inter, hidden = (int(d) for d in gate_up.shape)
        inter = two_inter // 2
        self.num_experts, self.rank, self.alpha = num_experts, rank, alpha
        self.use_rslora = use_rslora
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        dims = {"gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
        device, dtype = gate_up.device, gate_up.dtype
        for proj in self.projections:
            fan_in, fan_out = dims[proj]
            a = torch.empty(num_experts, rank, fan_in, device=device, dtype=dtype)
            b = torch.empty(num_experts, fan_out, rank, device=device, dtype=dtype)
            self.register_parameter(f"lora_A_{proj}", nn.Parameter(a))
            self.register_parameter(f"lora_B_{proj}", nn.Parameter(b))
        self.merged = False
        self.reset_adapter_parameters(init)

    def factors(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(A [E, r, in], B [E, out, r])`` of ``proj``."""
        return getattr(self, f"lora_A_{proj}"), getattr(self, f"lora_B_{proj}")

    def reset_adapter_parameters(
        self, init: str = "default", *, generator: torch.Generator | None = None
    ) -> None:
        """Initializes the factors in place as ``LoraLinear`` does, per expert; no-op on meta.

        ``"default"``: A uniform in ``±1/sqrt(in)`` (nn.Linear's Kaiming), B zero; ``"gaussian"``:
        A normal with std ``1/rank``, B zero; ``"random"``: B uniform in ``±1/sqrt(rank)`` too.
        Drawn on the CPU at full shape (sharded parameters take their slice).
        """
        for proj in self.projections:
            a_param, b_param = self.factors(proj)
            if a_param.device.type == "meta":
                return
            a = torch.empty(tuple(a_param.shape))
            if init == "gaussian":
                a.normal_(0.0, 1.0 / self.rank, generator=generator)
            else:
                bound = 1.0 / math.sqrt(a_param.shape[-1])
                a.uniform_(-bound, bound, generator=generator)
            b = torch.zeros(tuple(b_param.shape))
            if init == "random":
                bound = 1.0 / math.sqrt(self.rank)
                b.uniform_(-bound, bound, generator=generator)
            with torch.no_grad():
                _assign_full(a_param, a)
                _assign_full(b_param, b)

    def delta(self, proj: str, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Returns ``scaling * B_e (A_e x)`` for rows ``x`` grouped by expert (``[N, out]``)."""
        a, b = self.factors(proj)
        low = grouped_mm(x, a.to(x.dtype).transpose(1, 2), tokens_per_expert)
        return grouped_mm(low, b.to(x.dtype).transpose(1, 2), tokens_per_expert) * self.scaling

    def delta_weight(self, proj: str) -> torch.Tensor:
        """Returns ``scaling * B_e A_e`` for every expert: ``[E, out, in]`` (for merging)."""
        a, b = self.factors(proj)
        return torch.bmm(b, a) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, "
            f"projections={self.projections}"
        )


def attach_experts_lora(
    name: str,
    experts: nn.Module,
    projections: tuple[str, ...],
    *,
    rank: int,
    alpha: float,
    use_rslora: bool,
    init: str,
) -> ExpertsLora:
    """Returns the ``ExpertsLora`` now installed as ``experts.lora`` (grouped forward switched on).

    Raises:
        ValueError: the experts' forward was replaced by another library (expert parallelism),
            which would ignore the adapter: apply PEFT before parallelizing.
    """
    if has_own_forward(experts):
        raise ValueError(
            f"{name!r}: its forward was replaced on the instance (expert parallelism?), which "
            "would ignore a LoRA adapter; call apply_peft before automodel.parallel"
        )
    lora = ExpertsLora(
        experts, projections, rank=rank, alpha=alpha, use_rslora=use_rslora, init=init
    )
    experts.lora = lora
    use_grouped_forward(experts)  # the forward that adds the adapter
    return lora


def merge_experts_lora(experts: nn.Module, *, merge: bool = True) -> None:
    """Folds the adapter's delta weights into the expert weights (``merge=False``: takes them out).

    A merged adapter is skipped by the forward; merging twice (or unmerging an unmerged one) does
    nothing.
    """
    lora: ExpertsLora = experts.lora  # type: ignore[assignment]
    if lora.merged == merge:
        return
    sign = 1.0 if merge else -1.0
    gate_up: torch.Tensor = experts.gate_up_proj  # type: ignore[assignment]
    down: torch.Tensor = experts.down_proj  # type: ignore[assignment]
    inter = gate_up.shape[1] // 2
    with torch.no_grad():
        for proj in lora.projections:
            delta = lora.delta_weight(proj).to(gate_up.dtype) * sign
            if proj == "gate":
                gate_up[:, :inter].add_(delta)
            elif proj == "up":
                gate_up[:, inter:].add_(delta)
            else:
                down.add_(delta)
    lora.merged = merge


def per_expert_module_names(
    model_type: str, experts_fqn: str, num_experts: int, proj: str
) -> list[str]:
    """Returns the Hub's per-expert module names of ``proj`` (``...experts.{e}.w1`` for Mixtral)."""
    key_map = MoEKeyMap(model_type, num_experts)
    return [key_map.expert_module(experts_fqn, e, proj) for e in range(num_experts)]
