"""Pipeline parallelism for decoder models: stage splitting, stage modules and schedules."""

from automodel.parallel.pipeline.build import pipeline
from automodel.parallel.pipeline.schedule import PipelineSchedule, shift_labels, stage_indices
from automodel.parallel.pipeline.split import (
    DecoderLayout,
    balanced_split,
    find_decoder_layout,
    split_at,
)
from automodel.parallel.pipeline.stage import DecoderStage

__all__ = [
    "DecoderLayout",
    "DecoderStage",
    "PipelineSchedule",
    "balanced_split",
    "find_decoder_layout",
    "pipeline",
    "shift_labels",
    "split_at",
    "stage_indices",
]
