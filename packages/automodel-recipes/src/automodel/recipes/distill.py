"""Knowledge distillation: a student learns from a frozen teacher's token distributions and the labels.

    automodel distill                                    # bundled tiny default
    automodel run examples/distill_qwen3_8b_to_1b.yaml --nproc-per-node 8

Per label token: ``kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)) +
(1 - kd_weight) * CE(student, label)``; summed, then divided by the global label-token count like
every other loss. The ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et
al., 2015). Teacher and student must share the tokenizer (same vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from automodel.recipes._components import lm_inputs, token_loss_sum
from automodel.recipes._lm_training import run_causal_lm
from automodel.recipes._model_io import _load_model
from automodel.recipes.config import ConfigError, ModelSection, RecipeConfig
from automodel.recipes.data import IGNORE_INDEX
from automodel.recipes.train import Runtime


def kd_loss_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
) -> torch.Tensor:
    """Returns the summed distillation loss over label tokens (see the module docstring), fp32."""
    mask = labels != IGNORE_INDEX
    s = student[mask].float() / temperature
    t = teacher[mask].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    ce = token_loss_sum(student, labels)
    return kd_weight * temperature**2 * kl + (1.0 - kd_weight) * ce


def _distill_loss(
    cfg: RecipeConfig, rt: Runtime, model: Any
) -> Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]:
    assert cfg.distill is not None
    d = cfg.distill
    teacher_cfg = ModelSection(name_or_path=d.teacher, dtype=d.teacher_dtype or cfg.model.dtype)
    teacher = _load_model(teacher_cfg, device=rt.device).to(rt.device).eval().requires_grad_(False)

    def loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = lm_inputs(batch)
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        student_logits = model(**inputs).logits
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ConfigError(
                f"distill.teacher has vocabulary {teacher_logits.shape[-1]} but the student has "
                f"{student_logits.shape[-1]}; teacher and student must share a tokenizer"
            )
        return kd_loss_sum(
            student_logits, teacher_logits, batch["labels"], d.temperature, d.kd_weight
        )

    return loss


def run(cfg: RecipeConfig) -> Path:
    """Runs distillation per ``cfg``; returns the saved student folder."""
    return run_causal_lm(cfg, _distill_loss)
