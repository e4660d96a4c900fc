"""Sequence classification: a text classifier (encoder or decoder with a score head) on labelled text.

    automodel run examples/classification_bert.yaml
    automodel run examples/classification_bert.yaml --nproc-per-node 4

Records are ``{"text": ..., "label": <int>}`` (columns set by data.text_column/label_column). The
loss is cross-entropy per sequence, divided by the number of sequences in the global batch; the
log also reports accuracy on the validation split. Ends with ``output_dir/model`` (an HF
``AutoModelForSequenceClassification`` folder) and prints its path last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from automodel.recipes._components import build_optimizer
from automodel.recipes._fp8 import apply_fp8
from automodel.recipes._model_io import _load_model, load_tokenizer, save_final
from automodel.recipes._run_start import start_run
from automodel.recipes.config import ConfigError, RecipeConfig
from automodel.recipes.data import ShardedBatches, build_examples, collate
from automodel.recipes.train import (
    StepFunctions,
    build_scheduler,
    teardown_runtime,
    train,
)
from automodel.recipes.train._data_parallel import describe, parallelize_for_training
from automodel.recipes.train._runtime import all_reduce_sum


def run(cfg: RecipeConfig) -> Path:
    """Trains a sequence classifier per ``cfg``; returns the saved model folder."""
    if cfg.data.format != "classification":
        raise ConfigError("recipe 'classification' needs data.format=classification")
    if cfg.data.packing:
        raise ConfigError("data.packing does not apply to classification; set it to false")
    t = cfg.training
    rt, out, metrics = start_run(cfg)

    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    assert cfg.data.train is not None
    examples = build_examples(cfg.data, cfg.data.train, tokenizer, log=metrics.print)
    model = _load_model(cfg.model, "AutoModelForSequenceClassification", device=rt.device).to(
        rt.device
    )
    model = apply_fp8(model, cfg.fp8, rt.device, metrics.print)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the head pools the last real token
    par = parallelize_for_training(model, cfg.parallel, rt)
    model, rt = par.model, par.runtime
    metrics.print(
        f"model {cfg.model.name_or_path}: {describe(model)} on {rt.device} x{rt.world_size}"
    )

    optimizer = build_optimizer(cfg, model, rt.device)
    scheduler = build_scheduler(optimizer, t.max_steps, cfg.lr_scheduler)

    def collate_fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(rows, tokenizer.pad_token_id)

    batches = ShardedBatches(
        examples, t.micro_batch_size, collate_fn, rank=rt.dp_rank, world_size=rt.dp_size,
        seed=t.seed, shuffle=cfg.data.shuffle,
    )  # fmt: skip

    def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # type: ignore[no-any-return]

    def loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits(model, batch).float(), batch["label"], reduction="sum")

    fns = StepFunctions(
        loss=loss,
        count=lambda b: b["label"].new_tensor(b["label"].numel()),
        tokens=lambda b: b["attention_mask"].sum(),
        clip=par.clip,
        grad_scale=par.grad_scale,
    )
    result = train(cfg, rt, model, optimizer, scheduler, batches, fns, out, metrics)

    if cfg.data.validation is not None:
        val = build_examples(cfg.data, cfg.data.validation, tokenizer, log=metrics.print)
        model.eval()
        right = torch.zeros((), device=rt.device)
        seen = torch.zeros((), device=rt.device)
        with torch.no_grad():
            for start in range(
                rt.dp_rank * t.micro_batch_size, len(val), rt.dp_size * t.micro_batch_size
            ):
                b = {
                    k: v.to(rt.device)
                    for k, v in collate_fn(val[start : start + t.micro_batch_size]).items()
                }
                right += (logits(model, b).argmax(-1) == b["label"]).sum()
                seen += b["label"].numel()
        accuracy = float(all_reduce_sum(right, rt) / all_reduce_sum(seen, rt).clamp(min=1))
        metrics.print(f"val_accuracy={accuracy:.4f}")
        metrics.write(result.step, {"accuracy": accuracy}, prefix="val_")

    final = out.checkpoints / f"step_{result.step}"
    if not result.preempted:
        final = save_final(
            model, tokenizer, out.root / "model", adapter=False, distributed=rt.distributed
        )
        if rt.is_main:
            out.mark_finished(result.step, final)
            metrics.print(f"saved model: {final}")
    metrics.close()
    teardown_runtime()
    return final
