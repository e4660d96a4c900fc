"""Loading models/tokenizers for recipes and writing/sampling the final Hugging Face folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from automodel.recipes.config import ModelSection, TokenizerSection

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _auto_class(kind: str) -> Any:
    """Returns automodel.core's Auto class ``kind`` when core exports it, else transformers'."""
    try:
        import automodel.core as core

        cls = getattr(core, kind, None)
        if cls is not None:
            return cls
    except ImportError:
        pass
    import transformers

    return getattr(transformers, kind)


def resolve_dtype(name: str, device: torch.device | None) -> torch.dtype:
    """Returns the torch dtype for ``model.dtype``; ``auto`` is bfloat16 on a CUDA device, else float32."""
    if name == "auto":
        cuda = device is not None and device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def _load_model(
    cfg: ModelSection,
    kind: str = "AutoModelForCausalLM",
    *,
    device: torch.device | None = None,
    **kwargs: Any,
) -> Any:
    """Returns the model for ``cfg`` (weights loaded, or random init when ``from_scratch``).

    The one place recipes build models, so switching to automodel.core is a one-line change.

    Raises:
        ValueError: the model folder does not exist or holds no config.json.
    """
    from transformers import AutoConfig

    path = cfg.name_or_path
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ValueError(
            f"model.name_or_path {path!r} has no config.json; point it at an HF model folder"
        )
    cls = _auto_class(kind)
    dtype = resolve_dtype(cfg.dtype, device)
    extra: dict[str, Any] = dict(kwargs)
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ValueError(f"model.name_or_path {path!r}: cannot load its config ({e})") from None
    for key, value in cfg.config_overrides.items():
        setattr(config, key, value)
    if cfg.num_labels is not None:
        config.num_labels = cfg.num_labels  # resizes id2label/label2id too
    if cfg.from_scratch:
        return cls.from_config(
            config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra
        )
    return cls.from_pretrained(
        path, config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra
    )


def load_tokenizer(model: ModelSection, cfg: TokenizerSection, processor: bool = False) -> Any:
    """Returns the tokenizer (or processor) with the configured chat template and a pad token."""
    path = cfg.name_or_path or model.name_or_path
    # Import only the loader in use: transformers' processing modules alone cost seconds of start-up.
    loader: Any
    if processor:
        from transformers import AutoProcessor as loader
    else:
        from transformers import AutoTokenizer as loader
    try:
        tok = loader.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {path!r} cannot be loaded: {e}") from None
    if cfg.chat_template:
        template = cfg.chat_template
        if template.endswith(".jinja") and Path(template).is_file():
            template = Path(template).read_text()
        tok.chat_template = template
    text_tok = getattr(tok, "tokenizer", tok)
    if text_tok.pad_token_id is None:
        text_tok.pad_token = text_tok.eos_token
    return tok


def save_final(
    model: Any, tokenizer: Any, folder: Path, *, adapter: bool, distributed: bool
) -> Path:
    """Writes the model (or its PEFT adapter) and tokenizer to ``folder`` atomically; returns it.

    Collective: every rank calls it; each writes the slices it holds (automodel.ckpt), rank 0 the
    rest. The new folder is written beside the target and swapped in only when complete, so an
    interrupted save never destroys a previous one.
    """
    import torch.distributed as dist

    main = not distributed or dist.get_rank() == 0
    tmp = folder.with_name(folder.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    if adapter:
        from automodel.core.peft import save_adapter

        save_adapter(model, tmp)
    elif distributed:
        from automodel.ckpt import save

        save(model, tmp)
    else:
        model.save_pretrained(tmp)
    if not main:
        dist.barrier()
        return folder
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    if distributed:
        dist.barrier()
    return folder


def sample(folder: Path, prompt: str, max_new_tokens: int, adapter: bool = False) -> str:
    """Returns the greedy reply of the saved model in ``folder`` to a user message.

    Loads with plain transformers (an adapter on top of its base model), proving the folder works.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if adapter:
        import json

        from automodel.core.peft import load_adapter

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = load_adapter(AutoModelForCausalLM.from_pretrained(base), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    encoded: Any
    if tok.chat_template:
        encoded = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        encoded = tok(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    generate: Any = model.generate
    with torch.no_grad():
        out = generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
