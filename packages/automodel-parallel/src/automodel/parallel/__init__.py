"""automodel.parallel — PyTorch-native parallelism for any decoder model (depends on torch only).

See packages/automodel-parallel/README.md.
"""

from automodel.parallel.activation_checkpointing import apply_activation_checkpointing
from automodel.parallel.blocks import find_blocks
from automodel.parallel.config import ParallelConfig
from automodel.parallel.context import (
    causal_lm_buffers,
    context_parallel,
    load_balanced_indices,
    shard_sequence,
    unshard_sequence,
)
from automodel.parallel.expert import apply_expert_parallel, find_expert_modules
from automodel.parallel.fsdp import apply_fsdp
from automodel.parallel.grad_clip import clip_grad_norm_
from automodel.parallel.launch import init_distributed
from automodel.parallel.mesh import build_mesh
from automodel.parallel.parallelize import parallelize, validate_model
from automodel.parallel.pipeline import PipelineSchedule, pipeline
from automodel.parallel.reduction import global_mean_loss, reduce_data_parallel
from automodel.parallel.seeding import seed_ranks
from automodel.parallel.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

__version__ = "0.1.0"

__all__ = [
    "ParallelConfig",
    "PipelineSchedule",
    "__version__",
    "apply_activation_checkpointing",
    "apply_expert_parallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "build_mesh",
    "causal_lm_buffers",
    "clip_grad_norm_",
    "context_parallel",
    "find_blocks",
    "find_expert_modules",
    "global_mean_loss",
    "init_distributed",
    "load_balanced_indices",
    "parallelize",
    "pipeline",
    "reduce_data_parallel",
    "seed_ranks",
    "shard_sequence",
    "tensor_parallel_plan",
    "unshard_sequence",
    "validate_model",
]
