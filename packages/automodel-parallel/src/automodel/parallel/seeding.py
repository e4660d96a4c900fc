"""``seed_ranks``: per-rank seeds that are equal across tensor-parallel ranks only."""

from __future__ import annotations

import random

import torch
from torch.distributed.device_mesh import DeviceMesh

# Ranks that hold pieces of the same computation must draw the same numbers (dropout on a
# replicated activation); every other dim sees different data and should draw differently.
_SHARED_DIMS = ("tp",)


def seed_ranks(seed: int, mesh: DeviceMesh | None = None) -> int:
    """Returns the seed set on this rank for ``random`` and ``torch`` (CPU and CUDA).

    The seed is ``seed + k``, where ``k`` is this rank's index in the mesh with the tensor-
    parallel dim left out: tp ranks get the same seed, data/pipeline/context ranks differ.

    Args:
        seed: the run's base seed.
        mesh: a mesh from ``build_mesh`` (named dims); None seeds ``seed`` itself.

    Example:
        >>> seed_ranks(1234, mesh)  # rank (dp=1, tp=0) and (dp=1, tp=1) -> 1235
        1235
    """
    offset = 0
    if mesh is not None and mesh.mesh_dim_names is not None:
        coordinate = mesh.get_coordinate()
        assert coordinate is not None, "this rank is not part of the mesh"
        for dim, name in enumerate(mesh.mesh_dim_names):
            if name in _SHARED_DIMS:
                continue
            offset = offset * mesh.size(dim) + coordinate[dim]
    value = seed + offset
    random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    return value
