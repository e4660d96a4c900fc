"""``pipeline``: cut a decoder model into stages for this rank and build their schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage

from automodel.parallel.config import ParallelConfig
from automodel.parallel.pipeline.schedule import (
    _SCHEDULES,
    PipelineSchedule,
    _TiedWeights,
    stage_indices,
)
from automodel.parallel.pipeline.split import (
    DecoderLayout,
    balanced_split,
    find_decoder_layout,
    split_at,
)
from automodel.parallel.pipeline.stage import DecoderStage


def pipeline(
    model: nn.Module,
    config: ParallelConfig,
    mesh: DeviceMesh,
    *,
    parallelize_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[list[nn.Module], PipelineSchedule]:
    """Returns this rank's pipeline stage modules and the schedule that trains them.

    The model's blocks are split into ``pp * pp_virtual_stages`` stages, evenly
    (``balanced_split``) or at ``config.pp_split_points``; the first stage also holds the token
    embedding, the last the final norm and LM head, and every stage the rotary embedding. Stage
    modules share the model's modules and keep their FQNs, so optimizers and checkpoints work per
    stage by name. A tied embedding/head whose stages land on different ranks is untied into two
    copies whose gradients are summed after each step.

    Args:
        model: a Hugging Face-layout causal LM (``find_decoder_layout``), the same on every rank.
        config: reads ``pp``, ``pp_schedule``, ``pp_microbatches``, ``pp_virtual_stages`` and
            ``pp_split_points``.
        mesh: a DeviceMesh with a ``"pp"`` dim (or a 1D mesh used as the pipeline group).
        parallelize_fn: applied to every stage module before it is wrapped, e.g. FSDP/TP over
            the mesh's other dims (``lambda m: parallelize(m, config, mesh)``).

    Returns:
        ``(stage_modules, schedule)``: this rank's stages (one, or two or more for interleaved and
        ZBV schedules) and a :class:`PipelineSchedule` whose ``step(input_ids, labels)`` returns
        the loss on the rank holding the last stage.

    Raises:
        ValueError: ``config.pp`` differs from the mesh, more stages than blocks, a schedule
            that does not match ``pp_virtual_stages``, bad split points, or a model without the
            decoder layout.

    Example:
        >>> mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("pp",))  # doctest: +SKIP
        >>> config = ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=4)  # doctest: +SKIP
        >>> stages, schedule = pipeline(model, config, mesh)  # doctest: +SKIP
        >>> loss = schedule.step(input_ids, labels)  # doctest: +SKIP
    """
    pp_mesh, pp_dim = _pp_submesh(mesh)
    pp = pp_mesh.size()
    if config.pp != pp:
        raise ValueError(
            f"ParallelConfig.pp={config.pp} but the mesh's pp dim has {pp} ranks. Fix: build the "
            "mesh from the same config (build_mesh(config))."
        )
    schedule_name = config.pp_schedule
    multi = _SCHEDULES[schedule_name][1] == "multi"
    virtual = 2 if schedule_name == "zbv" else config.pp_virtual_stages
    if not multi and virtual != 1:
        raise ValueError(
            f"pp_schedule={schedule_name!r} runs one stage per rank but pp_virtual_stages="
            f"{virtual}. Fix: set pp_virtual_stages=1 or pp_schedule='interleaved_1f1b'."
        )
    if multi and virtual < 2:
        raise ValueError(
            f"pp_schedule={schedule_name!r} needs pp_virtual_stages >= 2 (got {virtual}). "
            "Fix: set pp_virtual_stages=2 or pp_schedule='1f1b'."
        )
    layout = find_decoder_layout(model)
    num_stages = pp * virtual
    if config.pp_split_points:
        splits = split_at(layout, list(config.pp_split_points), num_stages)
    else:
        splits = balanced_split(len(layout.layers), num_stages)

    n_microbatches = config.pp_microbatches or num_stages
    if schedule_name == "1f1b" and n_microbatches < pp:
        raise ValueError(
            f"pp_schedule='1f1b' needs pp_microbatches >= pp={pp} (got {n_microbatches}). "
            f"Fix: set pp_microbatches to {pp} or more."
        )

    pp_rank = pp_mesh.get_local_rank()
    tied = _untie_across_ranks(layout, mesh, pp_dim, schedule_name, pp, num_stages)
    modules: list[nn.Module] = []
    indices = stage_indices(schedule_name, pp_rank, pp, virtual)
    for index in indices:
        stage = DecoderStage(
            layout, splits[index], is_first=index == 0, is_last=index == num_stages - 1
        )
        modules.append(parallelize_fn(stage) if parallelize_fn is not None else stage)
    if tied is not None:
        tied.params = [
            p
            for m in modules
            for name, p in m.named_parameters()
            if name in (f"{layout.body_name}.embed_tokens.weight", f"{layout.head_name}.weight")
        ]

    device = _stage_device(mesh)
    group = pp_mesh.get_group()
    pipeline_stages = [
        PipelineStage(module, index, num_stages, device, group=group)
        for module, index in zip(modules, indices)
    ]
    schedule = PipelineSchedule(schedule_name, pipeline_stages, modules, n_microbatches, tied)
    return modules, schedule


def _pp_submesh(mesh: DeviceMesh) -> tuple[DeviceMesh, int]:
    """Returns the 1D ``pp`` mesh of ``mesh`` and the index of that dim in ``mesh``."""
    names = mesh.mesh_dim_names or ()
    if "pp" in names:
        return mesh["pp"], names.index("pp")
    if mesh.ndim == 1:
        return mesh, 0
    raise ValueError(
        f"pipeline needs a mesh with a 'pp' dim or a 1D mesh; got dims {names}. Fix: build the "
        "mesh with build_mesh(config) or pass mesh['pp']."
    )


def _stage_device(mesh: DeviceMesh) -> torch.device:
    """Returns the device this rank's stages run on."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _untie_across_ranks(
    layout: DecoderLayout,
    mesh: DeviceMesh,
    pp_dim: int,
    schedule_name: str,
    pp: int,
    num_stages: int,
) -> _TiedWeights | None:
    """Unties embedding and head when stage 0 and the last stage are on different ranks.

    Returns the gradient-summing helper (group None on ranks holding neither), or None when
    nothing is tied across ranks.
    """
    embed_weight = getattr(layout.body.embed_tokens, "weight", None)
    head_weight = getattr(layout.head, "weight", None)
    if embed_weight is None or head_weight is not embed_weight:
        return None
    last_pp_rank = 0 if schedule_name == "zbv" else (num_stages - 1) % pp
    if last_pp_rank == 0:
        return None
    layout.head.weight = nn.Parameter(head_weight.detach().clone())
    if pp == 2:
        # The pair is the pp group itself: no new group, and no collective over the whole world
        # (so pipelines of different models may run side by side on sub-meshes).
        return _TiedWeights([], mesh.get_group(pp_dim))
    # Every rank creates every pair's group (new_group is collective), then keeps its own.
    rows = mesh.mesh.movedim(pp_dim, -1).reshape(-1, pp)
    me = dist.get_rank()
    mine = None
    for row in rows.tolist():
        pair = [row[0], row[last_pp_rank]]
        group = dist.new_group(pair)
        if me in pair:
            assert isinstance(group, dist.ProcessGroup)
            mine = group
    return _TiedWeights([], mine)
