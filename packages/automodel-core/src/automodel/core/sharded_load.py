"""Large models: build on the meta device, parallelize, then each rank reads only its slices.

The model never materializes whole on any rank: parameters are created on ``meta``, sharded by
``automodel.parallel.parallelize`` (TP/SP, FSDP2, ...), allocated shard-sized with ``to_empty``,
and filled by ``automodel.ckpt.load``, which reads only the bytes of each rank's own slices from
the safetensors files. ``save_pretrained`` on the result writes a consolidated, standard HF folder
through ``automodel.ckpt.save`` (every rank calls it; each writes what it holds).

With ``peft=``, the adapters are added to the meta model before parallelizing (so they are sharded
with their base layers), skipped when reading the checkpoint, and initialized after it from one seed
shared by all ranks (see ``automodel.core.adapters``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automodel.core.adapters import add_adapters, checkpoint_tensors, init_adapters, shared_seed
from automodel.core.saving import install_save_pretrained

logger = logging.getLogger("automodel.core")


def parallel_config(parallel: Any, device_mesh: Any) -> Any:
    """Returns a ``ParallelConfig`` from a config, a dict, or the sizes of ``device_mesh``."""
    from automodel.parallel import ParallelConfig

    if isinstance(parallel, ParallelConfig):
        return parallel
    if isinstance(parallel, dict):
        return ParallelConfig.from_dict(parallel)
    if parallel is None and device_mesh is not None:
        fields = {f.name for f in dataclasses.fields(ParallelConfig)}
        names = device_mesh.mesh_dim_names or ()
        sizes = {n: device_mesh[n].size() for n in names if n in fields}
        return ParallelConfig(**sizes)
    raise ValueError(
        f"parallel={parallel!r} is not supported; expected a ParallelConfig, a dict such as "
        "{'dp_shard': -1, 'tp': 2}, or None together with device_mesh="
    )


def parallelize_model(model: nn.Module, *, parallel: Any, device_mesh: Any) -> nn.Module:
    """Returns ``model`` (already materialized) parallelized over ``device_mesh`` / ``parallel``."""
    from automodel.parallel import build_mesh, init_distributed, parallelize

    init_distributed()
    config = parallel_config(parallel, device_mesh)
    mesh = device_mesh if device_mesh is not None else build_mesh(config)
    model = parallelize(model, config, mesh)
    install_save_pretrained(model, sharded=True)
    return model


def load_parallel(
    model_cls: Any,
    name_or_path: Any,
    config: Any,
    *,
    parallel: Any,
    device_mesh: Any,
    patch: bool,
    peft: Any = None,
    adapter_seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Returns the checkpoint at ``name_or_path`` built on meta, parallelized and loaded by slices.

    Args:
        model_cls: automodel's class or a transformers Auto class.
        name_or_path: local folder or hub id of an HF checkpoint (safetensors).
        config: the model's ``PretrainedConfig``.
        parallel: ``ParallelConfig`` or dict; derived from ``device_mesh`` when None.
        device_mesh: the mesh to use; built from ``parallel`` when None.
        patch: apply the fallback kernel patches to transformers classes before parallelizing.
        peft: a LoRA config: adapters added before parallelizing, initialized after loading.
        adapter_seed: the adapters' initialization seed (rank 0's is used on every rank).
        kwargs: transformers arguments; ``dtype`` and the hub arguments are used here.
    """
    from automodel.ckpt import load
    from automodel.parallel import build_mesh, init_distributed, parallelize

    init_distributed()
    pconfig = parallel_config(parallel, device_mesh)
    mesh = device_mesh if device_mesh is not None else build_mesh(pconfig)
    dtype = _dtype(kwargs.pop("dtype", kwargs.pop("torch_dtype", None)), config)
    folder = _resolve(name_or_path, kwargs)
    with torch.device("meta"):
        if hasattr(model_cls, "_from_config"):
            model = model_cls._from_config(config, dtype=dtype)
        else:
            model = model_cls.from_config(config, dtype=dtype)
    if patch and not type(model).__module__.startswith("automodel.core.models."):
        from automodel.core.patching import patch_model

        patch_model(model)
    if peft is not None:
        add_adapters(model, peft, parallel=True)
    model = parallelize(model, pconfig, mesh)
    device = torch.device("cuda", torch.cuda.current_device()) if _on_cuda(mesh) else "cpu"
    model.to_empty(device=device)
    _init_buffers(model)
    load(checkpoint_tensors(model), folder, strict=True)
    if peft is not None:
        init_adapters(model, shared_seed(adapter_seed))
    _load_generation_config(model, folder)
    install_save_pretrained(model, sharded=True)
    model.eval()  # as transformers' from_pretrained returns it
    return model


def _dtype(dtype: Any, config: Any) -> torch.dtype | None:
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype  # type: ignore[no-any-return]


def _on_cuda(mesh: Any) -> bool:
    return str(getattr(mesh, "device_type", "cpu")) == "cuda"


def _resolve(name_or_path: Any, kwargs: dict[str, Any]) -> Path:
    """Returns a local folder holding the checkpoint (downloads config + safetensors if a hub id)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    hub = {
        k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs
    }
    return Path(
        snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"], **hub)
    )


def _init_buffers(model: nn.Module) -> None:
    """Recomputes non-persistent buffers (rope tables, embedding scales) lost on the meta device."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        if module._non_persistent_buffers_set and init is not None:
            init(module)


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    if not (folder / "generation_config.json").exists():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(folder)  # type: ignore[assignment]
