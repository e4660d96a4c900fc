"""Drop-in ``AutoModelFor*`` classes: transformers' API plus parallelism, kernels, PEFT, FP8, compile.

``from_pretrained`` / ``from_config`` accept every transformers argument and return a
``transformers.PreTrainedModel``: automodel's optimized class when one serves the config's
``model_type`` (see ``automodel.core.models.registry``), else the transformers class with kernel
patches (``automodel.core.patching``). Extra keyword arguments, all optional:

- ``parallel``: a ``ParallelConfig`` or dict: build on the meta device, parallelize, then each rank
  reads only its slices of the checkpoint (``automodel.core.sharded_load``).
- ``device_mesh``: a DeviceMesh to parallelize over (built from ``parallel`` when omitted).
- ``kernels``: ``"auto"`` (default), ``"none"`` (the stock transformers class, unpatched), or a
  dict ``{op: backend}`` forwarded to the kernels. ``{"attention": "sdpa"}`` (or ``"flex"``,
  ``"flash_attn"``, ``"te"``, ``"eager"``) picks the attention backend of this model only, like
  ``attn_implementation=`` does (e.g. SDPA with a dense mask where FlexAttention cannot compile);
  the other ops (``rms_norm``, ``apply_rotary``, ``swiglu``, ``geglu``, ``cross_entropy``,
  ``linear_cross_entropy``) are set process-wide.
- ``peft``: a LoRA / DoRA config (``automodel.core.LoraConfig``, a dict of its fields, or a peft
  ``LoraConfig``): adapters are added before parallelizing (sharded with their base layers), only
  they train, and they are initialized from a seed drawn from the global RNG (rank 0's when
  parallel), so ``torch.manual_seed(s)`` first gives the same adapters on any mesh.
  ``save_pretrained(path)`` then writes the adapter in the peft format
  (``peft.PeftModel.from_pretrained(base, path)`` loads it); ``save_pretrained(path, merged=True)``
  writes the full model with the adapters folded in.
- ``fp8``: True or a dict of ``convert_to_float8`` options (needs the kernels' ``fp8`` extra).
- ``compile``: True or a dict of ``torch.compile`` options, applied per decoder layer.
- ``force_hf``: True gives the transformers class (still kernel-patched unless kernels="none").
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from automodel.core import _ops
from automodel.core.adapters import add_adapters, draw_seed, init_adapters, shared_seed
from automodel.core.models.common.attention import Attention
from automodel.core.models.registry import optimized_class
from automodel.core.patching import patch_model
from automodel.core.saving import install_save_pretrained

logger = logging.getLogger("automodel.core")

_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
    "trust_remote_code",
    "code_revision",
)
# transformers' attn_implementation names -> automodel.kernels.attention backends
_ATTN_BACKENDS = {
    "sdpa": "sdpa",
    "eager": "eager",
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
    "flex_attention": "flex",
}
_ATTENTION_CHOICES = ("auto", "sdpa", "flex", "flash_attn", "te", "eager")


class _AutoModelBase:
    """Shared ``from_pretrained``/``from_config`` logic; subclasses name the HF Auto class."""

    _hf_auto: ClassVar[str]
    _head: ClassVar[str | None] = None  # which optimized head serves this Auto class, if any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated with "
            f"`{type(self).__name__}.from_pretrained(...)` or `.from_config(...)`"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        *model_args: Any,
        parallel: Any = None,
        device_mesh: Any = None,
        kernels: str | dict[str, str] = "auto",
        peft: Any = None,
        fp8: bool | dict[str, Any] = False,
        compile: bool | dict[str, Any] = False,
        force_hf: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Returns the model at ``pretrained_model_name_or_path``, loaded like transformers does.

        Args:
            pretrained_model_name_or_path: a hub id or a local directory.
            model_args: passed to the model class, as in transformers.
            parallel, device_mesh, kernels, peft, fp8, compile, force_hf: see the module docstring.
            kwargs: every transformers argument (``dtype``, ``revision``, ``attn_implementation``,
                ``trust_remote_code``, ``cache_dir``, ``token``, config overrides, ...).

        Returns:
            A ``transformers.PreTrainedModel``.

        Example:
            >>> model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        """
        _check_kernels(kernels)
        seed = draw_seed() if peft is not None else 0  # before anything else draws from the RNG
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            extra = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}
            config, kwargs = AutoConfig.from_pretrained(
                config if config is not None else pretrained_model_name_or_path,
                return_unused_kwargs=True,
                **hub,
                **extra,
            )
            kwargs.update(hub)
        model_cls = cls._select(config, kernels, force_hf)
        attn = kwargs.pop("attn_implementation", None)
        if parallel is not None or device_mesh is not None:
            from automodel.core.sharded_load import load_parallel

            model = load_parallel(
                model_cls,
                pretrained_model_name_or_path,
                config,
                parallel=parallel,
                device_mesh=device_mesh,
                patch=kernels != "none",
                peft=peft,
                adapter_seed=seed,
                **kwargs,
            )
            peft = None  # added before parallelizing
        else:
            if attn is not None and not _is_ours(model_cls):
                kwargs["attn_implementation"] = attn
            model = model_cls.from_pretrained(
                pretrained_model_name_or_path, *model_args, config=config, **kwargs
            )
        _set_attention(model, attn, kernels)
        patched = parallel is not None or device_mesh is not None
        return _finish(model, kernels, peft, seed, fp8, compile, patched=patched)

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        parallel: Any = None,
        device_mesh: Any = None,
        kernels: str | dict[str, str] = "auto",
        peft: Any = None,
        fp8: bool | dict[str, Any] = False,
        compile: bool | dict[str, Any] = False,
        force_hf: bool = False,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Returns a randomly initialized model for ``config`` (transformers' ``from_config``).

        Args:
            config: a ``transformers.PretrainedConfig``.
            parallel, device_mesh, kernels, peft, fp8, compile, force_hf: see the module docstring.
            kwargs: transformers' ``from_config`` arguments (``dtype``, ``attn_implementation``,
                ``trust_remote_code``).

        Example:
            >>> model = AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2))
        """
        _check_kernels(kernels)
        seed = draw_seed() if peft is not None else 0  # before the random init draws
        model_cls = cls._select(config, kernels, force_hf)
        attn = kwargs.pop("attn_implementation", None)
        if _is_ours(model_cls):
            kwargs.pop("trust_remote_code", None)
            model = model_cls._from_config(config, **kwargs)
        else:
            if attn is not None:
                kwargs["attn_implementation"] = attn
            model = getattr(transformers, cls._hf_auto).from_config(config, **kwargs)
        _set_attention(model, attn, kernels)
        parallel_build = parallel is not None or device_mesh is not None
        if parallel_build and kernels != "none" and not _is_ours(type(model)):
            patch_model(model)  # before parallelize: expert parallelism keeps the grouped experts
        if parallel_build:
            from automodel.core.sharded_load import parallelize_model

            if peft is not None:  # before parallelize, so adapters are sharded with their layers
                add_adapters(model, peft, parallel=True)
            model = parallelize_model(model, parallel=parallel, device_mesh=device_mesh)
            if peft is not None:
                init_adapters(model, shared_seed(seed))
                peft = None
        return _finish(model, kernels, peft, seed, fp8, compile, patched=parallel_build)

    @classmethod
    def _select(cls, config: PretrainedConfig, kernels: Any, force_hf: bool) -> Any:
        """Returns automodel's class for ``config`` or the transformers Auto class."""
        if not force_hf and kernels != "none" and cls._head is not None:
            ours = optimized_class(config, cls._head)
            if ours is not None:
                logger.info("automodel: %s uses automodel's %s", config.model_type, ours.__name__)
                return ours
        return getattr(transformers, cls._hf_auto)


def _is_ours(model_cls: Any) -> bool:
    return str(getattr(model_cls, "__module__", "")).startswith("automodel.core.models.")


def _check_kernels(kernels: Any) -> None:
    if isinstance(kernels, dict):
        attention = kernels.get("attention", "auto")
        if attention not in _ATTENTION_CHOICES:
            raise ValueError(
                f"kernels={{'attention': {attention!r}}} is not a backend; expected one of "
                f"{list(_ATTENTION_CHOICES)}"
            )
        _ops.set_backends({op: b for op, b in kernels.items() if op != "attention"})
    elif kernels not in ("auto", "none"):
        raise ValueError(
            f"kernels={kernels!r} is not supported; expected 'auto', 'none' or a dict "
            "{op: backend} such as {'attention': 'flex'}"
        )


def _set_attention(model: Any, attn_implementation: str | None, kernels: Any) -> None:
    """Sets the attention backend of automodel's attention layers in ``model`` (this model only).

    ``kernels={"attention": ...}`` wins over transformers' ``attn_implementation`` name.
    """
    backend = kernels.get("attention") if isinstance(kernels, dict) else None
    if backend is None and attn_implementation is not None and _is_ours(type(model)):
        if attn_implementation not in _ATTN_BACKENDS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by automodel's "
                f"models; expected one of {sorted(_ATTN_BACKENDS)} (or pass force_hf=True)"
            )
        backend = _ATTN_BACKENDS[attn_implementation]
    if backend is None:
        return
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def _finish(
    model: Any,
    kernels: Any,
    peft: Any,
    adapter_seed: int,
    fp8: bool | dict[str, Any],
    compile: bool | dict[str, Any],
    *,
    patched: bool,
) -> Any:
    """Applies the fallback patches, FP8, PEFT (when not added already) and compile; returns the model."""
    if kernels != "none" and not _is_ours(type(model)) and not patched:
        patch_model(model)
    if fp8:
        import automodel.kernels

        convert = automodel.kernels.convert_to_float8  # type: ignore[attr-defined]
        model = convert(model, **(fp8 if isinstance(fp8, dict) else {}))
    if peft is not None:
        add_adapters(model, peft, parallel=False)
        init_adapters(model, adapter_seed)
        install_save_pretrained(model, sharded=False)
    if compile:
        options = compile if isinstance(compile, dict) else {}
        for block in _decoder_layers(model):
            block.compile(**options)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Returns the repeated blocks (the largest ModuleList), compiled one by one."""
    lists: list[list[torch.nn.Module]] = [
        list(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)
    ]
    return max(lists, key=len) if lists else [model]


class AutoModelForCausalLM(_AutoModelBase):
    """``transformers.AutoModelForCausalLM`` with automodel's optimized decoders and extras."""

    _hf_auto = "AutoModelForCausalLM"
    _head = "causal_lm"


class AutoModel(_AutoModelBase):
    """``transformers.AutoModel`` (base models without a head), optimized where available."""

    _hf_auto = "AutoModel"
    _head = "base"


class AutoModelForImageTextToText(_AutoModelBase):
    """``transformers.AutoModelForImageTextToText`` (VLMs) through the patched fallback."""

    _hf_auto = "AutoModelForImageTextToText"


class AutoModelForSequenceClassification(_AutoModelBase):
    """``transformers.AutoModelForSequenceClassification`` through the patched fallback."""

    _hf_auto = "AutoModelForSequenceClassification"


def __getattr__(name: str) -> type:
    """Returns an automodel Auto class for any other transformers ``AutoModelFor*`` name."""
    if name.startswith("AutoModelFor") and hasattr(transformers, name):
        return type(name, (_AutoModelBase,), {"_hf_auto": name, "__module__": __name__})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
