"""``LoraConfig``: what to adapt (target patterns) and how (rank, alpha, dropout, DoRA, init)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ALL_LINEAR = "all-linear"

LoraInit = Literal["default", "gaussian", "random"]
_INITS = ("default", "gaussian", "random")
_QUANTIZATIONS = ("nf4",)

# adapter_config.json fields peft may write that change the math; we refuse what we do not implement
# rather than load an adapter that silently computes something else.
_UNSUPPORTED_PEFT_FIELDS = {
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained extra modules",
    "layers_to_transform": "layer selection by index",
    "layer_replication": "layer replication",
    "target_parameters": "parameter targets",
    "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


@dataclass(kw_only=True)
class LoraConfig:
    """Settings of a LoRA / DoRA adapter, applied with ``apply_peft(model, config)``.

    The adapted layer computes ``W x + b + scaling * B (A dropout(x))`` with ``A`` of shape
    ``(rank, in)``, ``B`` of shape ``(out, rank)`` and ``scaling = alpha / rank`` (or
    ``alpha / sqrt(rank)`` with ``use_rslora``), exactly as Hugging Face ``peft`` does, so adapters
    move between the two libraries unchanged.

    Args:
        rank: adapter rank ``r``.
        alpha: scaling numerator (peft's ``lora_alpha``).
        dropout: dropout probability on the adapter's input (peft's ``lora_dropout``).
        target_modules: which ``nn.Linear`` modules get an adapter. ``"all-linear"`` takes every
            linear layer except the output layer (``lm_head``, or a ``score``/``classifier`` head);
            a list of names matches a module whose qualified name equals an entry or ends with
            ``"." + entry`` (``["q_proj", "v_proj"]``); any other string is a regular expression that
            must match the whole qualified name (``r".*\\.layers\\.[01]\\..*_proj"``). Same rules as peft.
        exclude_modules: modules never adapted, with the same list / regex rules.
        use_dora: weight-decomposed LoRA (DoRA): a learned per-output-row magnitude.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(rank)``.
        init: ``"default"`` (A Kaiming-uniform, B zero: the adapted model starts equal to the base),
            ``"gaussian"`` (A normal with std ``1 / rank``, B zero) or ``"random"`` (both random: the
            adapter changes outputs from the start; for tests).
        task_type: peft task type written to ``adapter_config.json``; ``None`` infers it from the
            model class (``"CAUSAL_LM"`` for ``*ForCausalLM``).
        quantize_base: ``"nf4"`` stores the adapted layers' base weights in 4-bit NF4 through
            bitsandbytes (QLoRA; needs bitsandbytes and a CUDA GPU).

    Example:
        >>> LoraConfig(rank=16, alpha=32, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ALL_LINEAR
    exclude_modules: str | Sequence[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    init: LoraInit = "default"
    task_type: str | None = None
    quantize_base: Literal["nf4"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r}: expected a positive int, e.g. 8")
        if not self.alpha > 0:
            raise ValueError(
                f"LoraConfig.alpha={self.alpha!r}: expected a positive number, e.g. 16"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r}: expected a float in [0, 1)")
        if self.init not in _INITS:
            raise ValueError(f"LoraConfig.init={self.init!r}: expected one of {_INITS}")
        if self.quantize_base is not None and self.quantize_base not in _QUANTIZATIONS:
            raise ValueError(
                f"LoraConfig.quantize_base={self.quantize_base!r}: expected None or 'nf4'"
            )
        self.target_modules = _normalize_patterns("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = _normalize_patterns("exclude_modules", self.exclude_modules)

    @property
    def scaling(self) -> float:
        """Returns the factor applied to the adapter's output: ``alpha / rank`` (or ``/ sqrt(rank)``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any] | Any) -> LoraConfig:
        """Returns the ``LoraConfig`` equal to a peft LoRA config (a ``peft.LoraConfig`` or its dict).

        Args:
            peft_config: the parsed ``adapter_config.json`` of a peft LoRA adapter, or a
                ``peft.LoraConfig`` object.

        Returns:
            The equivalent ``LoraConfig``.

        Raises:
            ValueError: the config is not LoRA, or uses a peft feature automodel does not implement.

        Example:
            >>> LoraConfig.from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            ...                       "target_modules": ["q_proj"]}).rank
            4
        """
        data = dict(peft_config if isinstance(peft_config, Mapping) else peft_config.to_dict())
        peft_type = str(data.get("peft_type", "LORA"))
        peft_type = peft_type.rsplit(".", 1)[-1]  # "PeftType.LORA" from to_dict() -> "LORA"
        if peft_type != "LORA":
            raise ValueError(
                f"peft_type={peft_type!r}: automodel loads LoRA / DoRA adapters only "
                "(peft_type 'LORA'); load this adapter with the peft library instead"
            )
        for name, what in _UNSUPPORTED_PEFT_FIELDS.items():
            if data.get(name):
                raise ValueError(
                    f"adapter config sets {name}={data[name]!r} ({what}), which automodel does "
                    "not implement; use the peft library for this adapter, or retrain without it"
                )
        if data.get("bias", "none") != "none" or data.get("lora_bias"):
            raise ValueError(
                "adapter config trains biases (bias != 'none' or lora_bias=True), which automodel "
                "does not implement; use the peft library for this adapter"
            )
        if data.get("fan_in_fan_out"):
            raise ValueError(
                "adapter config has fan_in_fan_out=True (GPT-2 style Conv1D layers), which "
                "automodel does not implement; use the peft library for this adapter"
            )
        init = data.get("init_lora_weights", True)
        targets = data.get("target_modules")
        if targets is None:
            raise ValueError(
                "adapter config has no target_modules; automodel needs them to know which "
                "layers the adapter belongs to"
            )
        task_type = data.get("task_type")
        return cls(
            rank=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            exclude_modules=data.get("exclude_modules") or None,
            use_dora=bool(data.get("use_dora", False)),
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else ("random" if init is False else "default"),
            task_type=None if task_type is None else str(task_type).rsplit(".", 1)[-1],
        )


def as_lora_config(config: LoraConfig | Mapping[str, Any]) -> LoraConfig:
    """Returns ``config`` as a ``LoraConfig``; a dict is read as ``LoraConfig(**config)``."""
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, Mapping):
        if "peft_type" in config or "lora_alpha" in config:
            return LoraConfig.from_peft(config)
        return LoraConfig(**config)
    if hasattr(config, "peft_type") and hasattr(config, "to_dict"):
        return LoraConfig.from_peft(config)
    raise ValueError(
        f"peft config of type {type(config).__name__}: expected automodel.core.peft.LoraConfig, "
        "a dict of its fields, or a peft.LoraConfig"
    )


def _normalize_patterns(name: str, value: str | Sequence[str]) -> str | list[str]:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"LoraConfig.{name}='': expected 'all-linear', a regex or a list")
        return value
    patterns = list(value)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"LoraConfig.{name}={value!r}: expected a non-empty list of module names, "
            "e.g. ['q_proj', 'v_proj'], or a regex string"
        )
    return patterns
