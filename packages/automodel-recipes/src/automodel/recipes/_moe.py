"""Router losses and load-balance metrics of mixture-of-experts models in the training loop.

transformers adds ``router_aux_loss_coef * aux_loss`` to a *mean* loss; the loop sums token losses
and divides by the global token count once per step, so the loop adds the router terms itself,
weighted by this batch's label tokens: after the division each rank's term counts in proportion
to its tokens, exactly like the cross-entropy. The model's own addition is switched off.

- load balance (Switch Transformer): transformers' ``aux_loss`` (padding excluded), weight
  ``moe.aux_loss_coef`` (default: the model config's ``router_aux_loss_coef``);
- router z-loss (ST-MoE): mean over tokens and layers of ``logsumexp(router_logits)**2``, weight
  ``moe.z_loss_coef`` (default 0: off);
- metrics on log steps: both terms, and tokens-per-expert imbalance (max / mean, 1.0 = even).
"""

from __future__ import annotations

from typing import Any

import torch

from automodel.core.moe import moe_load_stats, num_routed_experts
from automodel.kernels import moe as kernels_moe
from automodel.recipes.config import ConfigError, MoESection

_COEF_ATTR = "router_aux_loss_coef"


def _router_owner(model: torch.nn.Module) -> torch.nn.Module | None:
    """Returns the module that holds ``router_aux_loss_coef`` (the *ForCausalLM), or None."""
    return next((m for m in model.modules() if hasattr(m, _COEF_ATTR)), None)


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None
) -> torch.Tensor:
    """Returns the mean of ``logsumexp(logits)**2`` over tokens (``mask`` True) of every layer, fp32."""
    logits = torch.cat(list(router_logits), dim=0)
    if mask is not None:  # [batch, seq] -> the rows of every layer's [batch * seq, E] logits
        logits = logits[mask.reshape(-1).bool().repeat(len(router_logits))]
    return kernels_moe.router_z_loss(logits)


class RouterLosses:
    """The router terms of one MoE model: forward kwargs, the term to add, the metrics to log."""

    def __init__(self, model: Any, aux_coef: float, z_coef: float, log_balance: bool) -> None:
        self.model = model
        self.aux_coef, self.z_coef, self.log_balance = aux_coef, z_coef, log_balance
        self._last: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: Any, section: MoESection) -> RouterLosses | None:
        """Returns the router terms for ``model``; None for a dense model with default settings.

        Raises:
            ConfigError: ``moe.*`` set for a model without experts.
        """
        config = getattr(model, "config", None)
        if config is None or not num_routed_experts(config):
            if section.aux_loss_coef or section.z_loss_coef:
                raise ConfigError(
                    f"moe.aux_loss_coef/moe.z_loss_coef are set but {type(model).__name__} has no "
                    "experts (mixture-of-experts only); remove the moe section"
                )
            return None
        owner = _router_owner(model)
        model_coef = float(getattr(owner, _COEF_ATTR, 0.0) or 0.0)
        aux = model_coef if section.aux_loss_coef is None else section.aux_loss_coef
        if owner is not None:
            setattr(owner, _COEF_ATTR, 0.0)  # the loop adds it, token-weighted (module docstring)
        if aux and owner is None:
            raise ConfigError(
                f"moe.aux_loss_coef={aux}: {type(model).__name__} returns no load-balancing loss "
                "(it balances its experts another way, e.g. DeepSeek's bias correction); set "
                "moe.aux_loss_coef: 0"
            )
        return cls(model, aux, section.z_loss_coef, section.log_balance)

    def forward_kwargs(self) -> dict[str, Any]:
        """Returns the extra forward kwargs: router logits are needed for either term."""
        return {"output_router_logits": True} if (self.aux_coef or self.z_coef) else {}

    def term(
        self, outputs: Any, batch: dict[str, torch.Tensor], n_label_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Returns ``(aux_coef * aux + z_coef * z) * n_label_tokens`` to add to the summed loss."""
        total = n_label_tokens.new_zeros((), dtype=torch.float32)
        if self.aux_coef and getattr(outputs, "aux_loss", None) is not None:
            aux = outputs.aux_loss.float()
            self._last["moe/aux_loss"] = aux.detach()
            total = total + self.aux_coef * aux
        if self.z_coef:
            z = router_z_loss(outputs.router_logits, batch.get("attention_mask"))
            self._last["moe/z_loss"] = z.detach()
            total = total + self.z_coef * z
        return total * n_label_tokens

    def metrics(self) -> dict[str, float]:
        """Returns the last micro-batch's router terms and load imbalance (host sync; log steps only)."""
        out = {name: float(value) for name, value in self._last.items()}
        if self.log_balance:
            stats = moe_load_stats(self.model)
            if stats is not None:
                out.update(stats.to_metrics())
        return out
