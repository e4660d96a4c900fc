"""Pipeline schedules (GPipe, 1F1B, Interleaved1F1B, ZBV) with a causal-LM loss per microbatch.

The schedules are torch.distributed.pipelining's; this module picks one by name, places stages on
ranks the way it expects, and drives it with ``step(input_ids, labels)``. The loss of each
microbatch is its summed token cross-entropy divided by the number of label tokens of the whole
batch, so the microbatch losses add up to exactly the mean token loss of the batch (what
``model(input_ids, labels=labels).loss`` gives) and their gradients need no further scaling, even
when microbatches hold different numbers of label tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import schedules as _torch_schedules

IGNORE_INDEX = -100

# schedule name -> (torch class name, stages per rank it takes: "single" or "multi")
_SCHEDULES: dict[str, tuple[str, str]] = {
    "gpipe": ("ScheduleGPipe", "single"),
    "1f1b": ("Schedule1F1B", "single"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "multi"),
    "zbv": ("ScheduleZBVZeroBubble", "multi"),
}


def stage_indices(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Returns the stage indices that ``pp_rank`` runs under ``schedule``.

    Looped schedules place stage ``s`` on rank ``s % pp``; ZBV places stages in a V: rank ``r``
    runs ``r`` and ``2 * pp - 1 - r`` (so rank 0 holds both the first and the last stage).

    Example:
        >>> stage_indices("interleaved_1f1b", 1, 2, 2)
        [1, 3]
        >>> stage_indices("zbv", 0, 2, 2)
        [0, 3]
    """
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual_stages)]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Returns ``labels`` shifted left by one with ``-100`` appended (what position t predicts).

    Example:
        >>> shift_labels(torch.tensor([[5, 6, 7]])).tolist()
        [[6, 7, -100]]
    """
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class _TokenMeanLoss:
    """Summed token cross-entropy of one microbatch over the batch's label-token count."""

    def __init__(self) -> None:
        self.num_tokens = 1

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            target.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss / self.num_tokens


class PipelineSchedule:
    """A pipeline schedule over this rank's stages; ``step`` runs forward and backward.

    Built by :func:`automodel.parallel.pipeline.pipeline`. Every rank of the pipeline calls
    ``step`` with the same batch; only the first stage reads ``input_ids`` and only the last stage
    computes the loss.

    Attributes:
        stages: this rank's stage modules.
        schedule: the underlying ``torch.distributed.pipelining`` schedule.
        has_first_stage: this rank runs stage 0.
        has_last_stage: this rank runs the last stage (and so returns the loss).
    """

    def __init__(
        self,
        name: str,
        pipeline_stages: list[Any],
        modules: list[nn.Module],
        n_microbatches: int,
        tied_weights: _TiedWeights | None = None,
    ) -> None:
        class_name, kind = _SCHEDULES[name]
        schedule_class = getattr(_torch_schedules, class_name)
        self._loss = _TokenMeanLoss()
        stages_arg = pipeline_stages[0] if kind == "single" else pipeline_stages
        self.schedule = schedule_class(
            stages_arg, n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=False
        )
        self.stages = modules
        self.n_microbatches = n_microbatches
        self.has_first_stage = any(getattr(m, "is_first", False) for m in modules)
        self.has_last_stage = any(getattr(m, "is_last", False) for m in modules)
        self._tied = tied_weights

    def step(
        self, input_ids: torch.Tensor, labels: torch.Tensor, *, num_tokens: int | None = None
    ) -> torch.Tensor | None:
        """Returns the batch's mean token loss on the last stage's rank (None elsewhere).

        Runs forward and backward of every microbatch; gradients accumulate into the stages'
        parameters (call ``optimizer.step()`` and ``zero_grad()`` around it as usual).

        Args:
            input_ids: ``[B, T]`` token ids; ``B`` is split into ``n_microbatches``.
            labels: ``[B, T]`` labels, unshifted, ``-100`` where no loss is taken (as for
                ``model(input_ids, labels=labels)``).
            num_tokens: divide the summed loss by this instead of this batch's label-token
                count, e.g. the count over all data-parallel ranks (then sum, don't average,
                gradients over those ranks).

        Returns:
            The loss (a detached scalar) on the rank holding the last stage, else None.
        """
        if input_ids.shape[0] < self.n_microbatches:
            raise ValueError(
                f"pipeline step got a batch of {input_ids.shape[0]} sequences but splits it into "
                f"{self.n_microbatches} microbatches. Fix: use a batch of at least "
                f"{self.n_microbatches} (ideally a multiple) or lower pp_microbatches."
            )
        target = shift_labels(labels)
        count = int((target != IGNORE_INDEX).sum()) if num_tokens is None else num_tokens
        self._loss.num_tokens = max(count, 1)
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first_stage else ()
        self.schedule.step(*args, target=target, losses=losses)
        if self._tied is not None:
            self._tied.sync_grads()
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()


class _TiedWeights:
    """Keeps a weight shared by the first and last stage equal when they sit on different ranks.

    Each of the two ranks holds its own copy; after backward their gradients are summed, so both
    copies see the gradient of the tied weight and stay identical under any optimizer.
    """

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
        self.params = params
        self.group = group

    def sync_grads(self) -> None:
        if self.group is None:
            return
        for param in self.params:
            grad = param.grad
            if grad is None:
                grad = torch.zeros_like(param)
                param.grad = grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            dist.all_reduce(local, group=self.group)
