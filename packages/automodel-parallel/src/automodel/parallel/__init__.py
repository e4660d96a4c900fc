"""automodel.parallel — PyTorch-native parallelism for any decoder model (depends on torch only).

See packages/automodel-parallel/README.md.
"""

from automodel.parallel.config import ParallelConfig
from automodel.parallel.launch import init_distributed
from automodel.parallel.mesh import build_mesh

__version__ = "0.1.0"

__all__ = [
    "ParallelConfig",
    "__version__",
    "build_mesh",
    "init_distributed",
]
