"""``LoraLinear``: an ``nn.Linear`` carrying a LoRA / DoRA adapter, peft-exact and parallel-aware.

It *is* an ``nn.Linear`` whose ``weight`` and ``bias`` are the original layer's parameters, so

* the model's state-dict keys for the base weights do not change (``...q_proj.weight``): a full
  checkpoint of an adapted model still reads and writes Hugging Face keys;
* tensor-parallel styles written for ``nn.Linear`` (torch's ``ColwiseParallel`` /
  ``RowwiseParallel``, automodel.parallel's plans) apply to it unchanged;
* the adapter tensors are direct parameters (``lora_A``, ``lora_B``, ``lora_magnitude_vector``),
  not submodules, which those styles could not shard.

When a parallel style distributes the layer it registers every parameter again as a DTensor; this
class then places the adapter after the base weight (see ``adapter_placements``): ``lora_A``
follows the weight's input-dim sharding, ``lora_B`` and the DoRA magnitude its output-dim sharding,
everything else is replicated. FSDP2 shards parameters without going through ``register_parameter``,
so it is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude_vector")


class LoraLinear(nn.Linear):
    """Returns ``W x + b`` plus a low-rank update; built from an existing ``nn.Linear``.

    Args:
        base: the linear layer to adapt; its ``weight`` / ``bias`` parameters are reused (not copied).
        rank: adapter rank.
        alpha: scaling numerator.
        dropout: dropout probability on the adapter's input.
        use_dora: add DoRA's learned per-output-row magnitude.
        use_rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
        init: ``"default"``, ``"gaussian"`` or ``"random"`` (see ``LoraConfig``).

    Example:
        >>> layer = LoraLinear(nn.Linear(8, 4), rank=2, alpha=4)
        >>> layer(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        if type(base) is not nn.Linear:
            raise ValueError(
                f"LoraLinear wraps plain torch.nn.Linear layers, got {type(base).__name__}; "
                "exclude this module from target_modules (or apply adapters before quantizing)"
            )
        # nn.Linear.__init__ would allocate a fresh weight: reuse the base layer's parameters instead.
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.train(base.training)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.use_dora = use_dora
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.merged = False
        self._merged_weight_norm: torch.Tensor | None = None
        self._quantized = False
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=device, dtype=dtype))
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype)
            )
        self.reset_adapter_parameters(init)

    @torch.no_grad()
    def reset_adapter_parameters(
        self, init: str = "default", *, generator: torch.Generator | None = None
    ) -> None:
        """Initializes the adapter in place; a no-op while the layer is on the meta device.

        ``"default"`` (A Kaiming-uniform as ``nn.Linear``, B zero) and ``"gaussian"`` (A normal
        with std ``1 / rank``, B zero) leave the layer equal to its base; ``"random"`` draws B too.
        The DoRA magnitude becomes the row norms of the adapted weight. Values are drawn at full
        shape on the CPU from ``generator`` (the global RNG when None) and sharded DTensor
        parameters take their slice, so equal generators give equal adapters on every rank and
        in a single process.
        """
        if self.lora_A.device.type == "meta":
            return
        a_bound, b_bound = 1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.rank)
        a = torch.empty(tuple(self.lora_A.shape))
        if init == "gaussian":
            a.normal_(0.0, 1.0 / self.rank, generator=generator)
        else:  # kaiming_uniform_(a=sqrt(5)) of nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            a.uniform_(-a_bound, a_bound, generator=generator)
        b = torch.zeros(tuple(self.lora_B.shape))
        if init == "random":
            b.uniform_(-b_bound, b_bound, generator=generator)
        _assign_full(self.lora_A, a)
        _assign_full(self.lora_B, b)
        if self.use_dora:
            norm = self._weight_norm(self.dense_weight(), self._lora_weight())
            _assign_full(self.lora_magnitude_vector, norm)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._base_forward(x)
        if self.merged:
            return result
        dropout_active = self.training and self.dropout > 0
        dropped = F.dropout(x, self.dropout, training=True) if dropout_active else x
        lora_out = F.linear(F.linear(dropped, self.lora_A), self.lora_B)
        if not self.use_dora:
            return result + lora_out * self.scaling
        # DoRA (Liu et al. 2024, sec. 4.3): the row norm of the adapted weight is treated as a
        # constant, so it is detached and the magnitude alone learns the scale.
        weight = self.dense_weight().to(x.dtype)
        weight_norm = self._weight_norm(weight, self._lora_weight().detach()).detach()
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        if not dropout_active:
            base_out = result if self.bias is None else result - self.bias
        else:
            base_out = F.linear(dropped, weight)
        dora_out = (mag_norm_scale - 1) * base_out + mag_norm_scale * lora_out * self.scaling
        return result + dora_out

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantized:
            from automodel.core.peft.qlora import nf4_linear

            return nf4_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """Returns the base weight as a dense tensor (dequantized when the base is 4-bit)."""
        if self._quantized:
            from automodel.core.peft.qlora import nf4_dequantize

            return nf4_dequantize(self.weight)
        return self.weight

    def _lora_weight(self) -> torch.Tensor:
        # (A^T then B)^T rather than B @ A: the order peft uses, so fp32 results match it exactly.
        return F.linear(self.lora_A.t().contiguous(), self.lora_B).t()

    def _weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).to(weight.dtype)

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Folds the adapter into ``weight`` so the forward is a plain linear; ``unmerge`` undoes it."""
        if self.merged:
            return
        if self._quantized:
            raise ValueError(
                "cannot merge an adapter into a 4-bit (NF4) base weight: load the base model in "
                "bf16/fp32, load_adapter() onto it, then merge"
            )
        delta = (self._lora_weight() * self.scaling).to(self.weight.dtype)
        if self.use_dora:
            # The norm must come from the unmerged weight, as in forward; keep it for unmerge.
            norm = torch.linalg.norm(self.weight + delta, dim=1).to(self.weight.dtype)
            self._merged_weight_norm = norm
            factor = (self.lora_magnitude_vector / norm).view(-1, 1)
            self.weight.copy_((factor * (self.weight + delta)).to(self.weight.dtype))
        else:
            self.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts a merged adapter from ``weight`` again (exact up to float rounding)."""
        if not self.merged:
            return
        delta = (self._lora_weight() * self.scaling).to(self.weight.dtype)
        if self.use_dora:
            assert self._merged_weight_norm is not None
            factor = (self.lora_magnitude_vector / self._merged_weight_norm).view(-1, 1)
            self.weight.copy_((self.weight / factor - delta).to(self.weight.dtype))
            self._merged_weight_norm = None
        else:
            self.weight.sub_(delta)
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """Returns a plain ``nn.Linear`` sharing this layer's weight and bias (merge first to keep the adapter)."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight = self.weight
        linear.register_parameter("bias", self.bias)
        linear.train(self.training)
        return linear

    # ---------------------------------------------------------------- parallelism
    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if "lora_A" in self._parameters:  # fully built: keep the adapter placed after the weight
            self._place_adapter_after_weight()

    def _place_adapter_after_weight(self) -> None:
        from torch.distributed.tensor import DTensor

        weight = self._parameters.get("weight")
        if not isinstance(weight, DTensor):
            return
        for name in ADAPTER_PARAMS:
            param = self._parameters.get(name)
            if not isinstance(param, DTensor) or param.device_mesh != weight.device_mesh:
                continue
            wanted = adapter_placements(name, weight.placements)
            if tuple(param.placements) != wanted:
                placed = param.detach().redistribute(weight.device_mesh, wanted)
                nn.Module.register_parameter(
                    self, name, nn.Parameter(placed, requires_grad=param.requires_grad)
                )

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return (
            f"{super().extra_repr()}, {kind}_rank={self.rank}, alpha={self.alpha}, "
            f"dropout={self.dropout}, merged={self.merged}"
        )


def adapter_placements(name: str, weight_placements: Sequence[Any]) -> tuple[Any, ...]:
    """Returns the DTensor placements of adapter tensor ``name`` given the base weight's placements.

    A linear weight is ``(out, in)``. ``lora_A`` ``(rank, in)`` is sharded where the weight's input
    dim is (row-wise TP) so ``x @ A.T`` yields partial sums reduced together with the base output;
    ``lora_B`` ``(out, rank)`` and the magnitude ``(out,)`` are sharded where the output dim is
    (column-wise TP) so the adapter output is sharded like the base output. Otherwise: replicated.

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> adapter_placements("lora_A", [Shard(0)]), adapter_placements("lora_B", [Shard(0)])
        ((Replicate(),), (Shard(dim=0),))
    """
    from torch.distributed.tensor import Replicate, Shard

    placements: list[Any] = []
    for placement in weight_placements:
        sharded_dim = placement.dim % 2 if isinstance(placement, Shard) else None
        if name == "lora_A":
            placements.append(Shard(1) if sharded_dim == 1 else Replicate())
        else:
            placements.append(Shard(0) if sharded_dim == 0 else Replicate())
    return tuple(placements)


def _assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copies the full-shape ``full`` into ``param``, taking only this rank's slice of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        if isinstance(full, DTensor):
            local = full.redistribute(param.device_mesh, param.placements).to_local()
        else:
            # Every rank holds the same full values: slice locally, no communication.
            sharded = distribute_tensor(
                full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            )
            local = sharded.to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
