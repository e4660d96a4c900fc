"""``parallelize``: one call that applies TP/SP, EP, activation checkpointing, compile and FSDP2.

The order matters: tensor parallelism rewrites parameters into DTensors over ``tp`` and FSDP must
see those to shard them again over the data-parallel dims (2-D parameters); checkpointing wraps
the block forward so that compile traces the recompute too; FSDP comes last so its hooks sit
outside both and its all-gathers overlap the compiled blocks.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from automodel.parallel.activation_checkpointing import apply_activation_checkpointing
from automodel.parallel.blocks import find_blocks
from automodel.parallel.config import ParallelConfig
from automodel.parallel.fsdp import apply_fsdp
from automodel.parallel.mesh import build_mesh
from automodel.parallel.tensor_parallel import (
    _is_moe,
    apply_tensor_parallel,
    tensor_parallel_plan,
)


def _num_experts(model: nn.Module) -> list[tuple[str, int]]:
    out = []
    for fqn, module in model.named_modules():
        if _is_moe(module):
            for name, child in module.named_children():
                shapes = [p.shape[0] for p in child.parameters(recurse=False) if p.ndim == 3]
                if shapes:
                    out.append((f"{fqn}.{name}", shapes[0]))
    return out


def validate_model(
    model: nn.Module,
    config: ParallelConfig,
    *,
    blocks: str | list[str] | None = None,
    check_tp: bool = True,
) -> None:
    """Raises ValueError when ``config`` cannot parallelize ``model``; returns None when it can.

    Args:
        model: the full model (before any pipeline split).
        config: the sizes to check.
        blocks: FQN(s) of the layer list(s) when the search does not find them.
        check_tp: check the automatic tensor-parallel plan (off when a plan is given).

    Checks tp against the attention and key/value heads (and fused projections), pp against the
    number of layers, and ep against the number of experts of every MoE layer.

    Example:
        >>> validate_model(hf_llama, ParallelConfig(tp=3))
        Traceback (most recent call last):
        ValueError: tp=3 does not divide the 4 attention heads of model.layers.0.self_attn; ...
    """
    # A pipeline stage (no HF config) holds a part of the layers: pipeline() checked the split.
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if config.pp > 1 and layers is not None and config.pp > layers:
        raise ValueError(
            f"pp={config.pp} is larger than the {layers} layers of {type(model).__name__}; "
            f"use pp <= {layers} (each stage needs at least one layer)"
        )
    if config.tp > 1 and check_tp:
        tensor_parallel_plan(
            model, config.tp, sequence_parallel=config.sequence_parallel, blocks=blocks
        )
    if config.ep > 1:
        experts = _num_experts(model)
        if not experts:
            raise ValueError(
                f"ep={config.ep} but {type(model).__name__} has no MoE experts; use ep=1"
            )
        for fqn, n in experts:
            if n % config.ep != 0:
                raise ValueError(
                    f"ep={config.ep} does not divide the {n} experts of {fqn}; choose ep among "
                    f"{[d for d in range(1, n + 1) if n % d == 0]}"
                )


def parallelize(
    model: nn.Module,
    config: ParallelConfig,
    mesh: DeviceMesh | None = None,
    *,
    plan: dict[str, Any] | None = None,
    blocks: str | list[str] | None = None,
) -> nn.Module:
    """Returns ``model`` parallelized in place: TP/SP -> EP -> checkpointing -> compile -> FSDP2.

    Works for Hugging Face decoders (found by structure; transformers is never imported) and for
    plain PyTorch models with a repeated block list. After tensor parallelism the model keeps its
    forward semantics: outputs are replicated (unless ``config.loss_parallel``). With a world of
    data-parallel size 1 FSDP is skipped.

    Args:
        model: the model, on its target device (or meta, to be materialized after).
        config: sizes and options.
        mesh: from ``build_mesh(config)``; built when None.
        plan: ``{fqn_pattern: style}`` replacing the automatic tensor-parallel plan, with styles
            ``"colwise"``, ``"rowwise"``, ``"colwise_replicate"``, ``"rowwise_replicate"``,
            ``"sequence_parallel"``, ``"replicate"`` or ``ParallelStyle`` objects.
        blocks: FQN(s) of the repeated layer list(s) when the search does not find them.

    Returns:
        The same module object.

    Raises:
        ValueError: when the sizes do not match the mesh, or the model cannot take them (tp not
            dividing the heads, pp larger than the layers, ep not dividing the experts).

    Example:
        >>> init_distributed()
        >>> config = ParallelConfig(dp_shard=-1, tp=2, activation_checkpointing="selective")
        >>> model = parallelize(hf_model, config, build_mesh(config))
    """
    if mesh is None:
        mesh = build_mesh(config)
    config = config.resolved(mesh.size())
    for dim in ("tp", "pp", "cp", "dp_replicate", "dp_shard"):
        if mesh[dim].size() != getattr(config, dim):
            raise ValueError(
                f"mesh dim {dim!r} has size {mesh[dim].size()} but config.{dim}="
                f"{getattr(config, dim)}; build the mesh from the same config (build_mesh(config))"
            )
    validate_model(model, config, blocks=blocks, check_tp=plan is None)
    if config.tp > 1:
        styles: dict[str, str | ParallelStyle] | None = plan
        apply_tensor_parallel(
            model,
            mesh["tp"],
            plan=styles,
            sequence_parallel=config.sequence_parallel,
            loss_parallel=config.loss_parallel,
            blocks=blocks,
        )
    if config.ep > 1:
        from automodel.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, mesh)
    block_modules = [b for _, b in find_blocks(model, blocks)]
    apply_activation_checkpointing(block_modules, config.activation_checkpointing)
    if config.compile:
        options = config.compile if isinstance(config.compile, dict) else {}
        for block in block_modules:
            block.compile(**options)
    if config.dp_replicate * config.dp_shard * config.cp > 1:
        apply_fsdp(model, block_modules, config, mesh)
    return model
