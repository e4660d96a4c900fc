"""Training loop building blocks: runtime, schedules, checkpoints, metrics, signals, the loop."""

from automodel.recipes.train._loop import LoopResult, StepFunctions, train, validate
from automodel.recipes.train._metrics import MetricsLogger
from automodel.recipes.train._output import RunDir, RunError
from automodel.recipes.train._runtime import Runtime, setup_runtime, teardown_runtime
from automodel.recipes.train._schedules import build_scheduler, lr_multiplier
from automodel.recipes.train._signals import PreemptionFlag

__all__ = [
    "LoopResult",
    "MetricsLogger",
    "PreemptionFlag",
    "RunDir",
    "RunError",
    "Runtime",
    "StepFunctions",
    "build_scheduler",
    "lr_multiplier",
    "setup_runtime",
    "teardown_runtime",
    "train",
    "validate",
]
