"""``build_mesh``: the named DeviceMesh of a ``ParallelConfig``.

Layout (outermost first): ``pp, dp_replicate, dp_shard, cp, tp``; tp is innermost so its
collectives stay inside a node. Every dim exists, size 1 included, so code can always ask for
``mesh["tp"]``. Flattened dims for reductions and FSDP:

- ``dp`` = dp_replicate x dp_shard: the batch dim (each dp rank reads different data).
- ``dp_shard_cp`` = dp_shard x cp: what FSDP shards parameters over (cp ranks hold the same
  weights, so they share in the sharding).
- ``dp_cp`` = dp_replicate x dp_shard x cp: where loss and token counts are summed.

Expert parallelism borrows ranks instead of adding them (as torchtitan does): ``dp_shard`` is
split into ``dp_shard_mod_ep x dp_shard_in_ep`` with ``dp_shard_in_ep = ep / cp``, and
``ep`` = dp_shard_in_ep x cp. Experts are sharded over ``ep``; their remaining data-parallel
copies are FSDP-sharded over ``dp_shard_mod_ep`` (and replicated over dp_replicate). With
``ep == 1``, ``dp_shard_in_ep`` and ``ep`` have size 1 and ``dp_shard_mod_ep`` equals dp_shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from automodel.parallel.config import ParallelConfig


def build_mesh(config: ParallelConfig, device_type: str | None = None) -> DeviceMesh:
    """Returns the named DeviceMesh for ``config`` over the current world.

    Args:
        config: sizes; ``dp_shard=-1`` is resolved from the world size.
        device_type: ``"cuda"`` or ``"cpu"``; None = cuda when available.

    Returns:
        A mesh with dims ``pp, dp_replicate, dp_shard_mod_ep, dp_shard_in_ep, cp, tp`` and the
        flattened dims ``dp_shard``, ``dp``, ``dp_shard_cp``, ``dp_cp``, ``ep``.

    Raises:
        ValueError: when the sizes do not multiply to the world size, or ``ep`` does not fit.

    Example:
        >>> config = ParallelConfig(dp_shard=-1, tp=2)  # under torchrun --nproc-per-node 4
        >>> mesh = build_mesh(config)
        >>> mesh["tp"].size(), mesh["dp"].size()
        (2, 2)
    """
    if not dist.is_initialized():
        raise ValueError(
            "build_mesh needs a process group; call automodel.parallel.init_distributed() first"
        )
    c = config.resolved(dist.get_world_size())
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    in_ep = c.ep // c.cp if c.ep > 1 else 1
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
    sizes = (c.pp, c.dp_replicate, c.dp_shard // in_ep, in_ep, c.cp, c.tp)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
    mesh["dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp_shard")
    mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"]._flatten("dp")
    mesh["dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp"]._flatten("dp_cp")
    if c.ep > 1:
        mesh["dp_shard_in_ep", "cp"]._flatten("ep")
    else:
        # Any size-1 dim serves as a trivial ep group; flattening one dim just renames it.
        mesh["dp_shard_in_ep"]._flatten("ep")
    return mesh
