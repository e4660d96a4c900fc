"""Vision-language SFT: image + text chats rendered by the model's processor, loss on assistant turns.

    automodel run examples/vlm_sft.yaml --nproc-per-node 8

Records: ``{"messages": [...], "images": ["a.jpg", ...]}`` where user contents hold
``{"type": "image"}`` items (filled with the paths in order, relative to the data file) and text
items. Ends with ``output_dir/model`` (processor included) and prints its path last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automodel.recipes._components import build_loss, build_optimizer, lm_inputs
from automodel.recipes._fp8 import apply_fp8
from automodel.recipes._model_io import _load_model, load_tokenizer, save_final
from automodel.recipes._run_start import start_run
from automodel.recipes.config import ConfigError, RecipeConfig
from automodel.recipes.data import IGNORE_INDEX, ShardedBatches
from automodel.recipes.data._vlm import build_vlm_examples, collate_vlm
from automodel.recipes.train import (
    StepFunctions,
    build_scheduler,
    teardown_runtime,
    train,
)
from automodel.recipes.train._data_parallel import describe, parallelize_for_training


def run(cfg: RecipeConfig) -> Path:
    """Runs VLM SFT per ``cfg``; returns the saved model folder."""
    if cfg.data.format != "vlm_chat":
        raise ConfigError("recipe 'vlm_sft' needs data.format=vlm_chat")
    if cfg.data.packing:
        raise ConfigError("data.packing is not supported for vlm_sft; set it to false")
    t = cfg.training
    rt, out, metrics = start_run(cfg)

    processor = load_tokenizer(cfg.model, cfg.tokenizer, processor=True)
    pad_id = processor.tokenizer.pad_token_id
    assert cfg.data.train is not None
    examples = build_vlm_examples(cfg.data, cfg.data.train, processor, log=metrics.print)

    model = _load_model(cfg.model, "AutoModelForImageTextToText", device=rt.device).to(rt.device)
    model = apply_fp8(model, cfg.fp8, rt.device, metrics.print)
    par = parallelize_for_training(model, cfg.parallel, rt)
    model, rt = par.model, par.runtime
    metrics.print(
        f"model {cfg.model.name_or_path}: {describe(model)} on {rt.device} x{rt.world_size}"
    )
    optimizer = build_optimizer(cfg, model, rt.device)
    scheduler = build_scheduler(optimizer, t.max_steps, cfg.lr_scheduler)
    loss_fn = build_loss(cfg)
    dtype = next(model.parameters()).dtype

    def collate_fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_vlm(rows, pad_id)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    batches = ShardedBatches(
        examples, t.micro_batch_size, collate_fn, rank=rt.dp_rank, world_size=rt.dp_size,
        seed=t.seed, shuffle=cfg.data.shuffle,
    )  # fmt: skip

    def loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(model(**lm_inputs(batch)).logits, batch["labels"])  # type: ignore[no-any-return]

    fns = StepFunctions(
        loss=loss,
        count=lambda b: (b["labels"] != IGNORE_INDEX).sum(),
        tokens=lambda b: b["attention_mask"].sum(),
        clip=par.clip,
        grad_scale=par.grad_scale,
    )
    result = train(cfg, rt, model, optimizer, scheduler, batches, fns, out, metrics)

    final = out.checkpoints / f"step_{result.step}"
    if not result.preempted:
        final = save_final(
            model, processor, out.root / "model", adapter=False, distributed=rt.distributed
        )
        if rt.is_main:
            out.mark_finished(result.step, final)
            metrics.print(f"saved model: {final}")
    metrics.close()
    teardown_runtime()
    return final
