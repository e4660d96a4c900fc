"""The causal-LM training run shared by SFT, pretraining and distillation; each passes its loss.

Reads top to bottom: runtime -> run folder -> tokenizer and data -> model (+LoRA, parallel) ->
optimizer and schedule -> the loop -> final HF folder (or adapter) -> a sample reply -> its path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from automodel.recipes._components import build_optimizer
from automodel.recipes._fp8 import apply_fp8
from automodel.recipes._lm_loss import CausalLMLoss
from automodel.recipes._model_io import _load_model, load_tokenizer, sample, save_final
from automodel.recipes._peft import apply_lora
from automodel.recipes._run_start import start_run
from automodel.recipes.config import RecipeConfig
from automodel.recipes.data import (
    IGNORE_INDEX,
    ShardedBatches,
    StreamingBatches,
    build_examples,
    collate,
)
from automodel.recipes.train import (
    Runtime,
    StepFunctions,
    build_scheduler,
    teardown_runtime,
    train,
)
from automodel.recipes.train._data_parallel import describe, parallelize_for_training

LossFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
LossFactory = Callable[[RecipeConfig, Runtime, Any], LossFn]


def default_loss(cfg: RecipeConfig, rt: Runtime, model: Any) -> LossFn:
    """Returns the causal-LM loss of ``model`` per ``cfg`` (see :class:`CausalLMLoss`)."""
    return CausalLMLoss(cfg, model)


def run_causal_lm(cfg: RecipeConfig, make_loss: LossFactory = default_loss) -> Path:
    """Trains a causal LM per ``cfg`` with the loss ``make_loss`` builds; returns the output folder."""
    t = cfg.training
    rt, out, metrics = start_run(cfg)

    tokenizer = load_tokenizer(cfg.model, cfg.tokenizer)
    assert cfg.data.train is not None
    examples = (
        None
        if cfg.data.streaming
        else build_examples(cfg.data, cfg.data.train, tokenizer, log=metrics.print)
    )
    val_examples = (
        build_examples(cfg.data, cfg.data.validation, tokenizer, log=metrics.print)
        if cfg.data.validation is not None
        else None
    )

    model = _load_model(cfg.model, device=rt.device).to(rt.device)
    model = apply_fp8(model, cfg.fp8, rt.device, metrics.print)
    if cfg.peft is not None:
        model = apply_lora(model, cfg.peft, rt.world_size)
    par = parallelize_for_training(model, cfg.parallel, rt)
    model, rt = par.model, par.runtime
    if t.compile:
        model.compile()
    metrics.print(
        f"model {cfg.model.name_or_path}: {describe(model)} on {rt.device} x{rt.world_size}"
    )

    optimizer = build_optimizer(cfg, model, rt.device)
    scheduler = build_scheduler(optimizer, t.max_steps, cfg.lr_scheduler)
    loss = make_loss(cfg, rt, model)

    def collate_fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(rows, tokenizer.pad_token_id)

    batches: ShardedBatches | StreamingBatches
    if examples is None:  # data.streaming: read lazily, packed on the fly
        batches = StreamingBatches(
            cfg.data.train, cfg.data, tokenizer, t.micro_batch_size, collate_fn,
            rank=rt.dp_rank, world_size=rt.dp_size, seed=t.seed, log=metrics.print,
        )  # fmt: skip
    else:
        batches = ShardedBatches(
            examples, t.micro_batch_size, collate_fn, rank=rt.dp_rank, world_size=rt.dp_size,
            seed=t.seed, shuffle=cfg.data.shuffle,
        )  # fmt: skip
    val = (
        ShardedBatches(
            val_examples,
            t.micro_batch_size,
            collate_fn,
            rank=rt.dp_rank,
            world_size=rt.dp_size,
            shuffle=False,
        )
        if val_examples
        else None
    )

    fns = StepFunctions(
        loss=loss,
        count=lambda b: (b["labels"] != IGNORE_INDEX).sum(),
        tokens=lambda b: (
            b["attention_mask"].sum()
            if "attention_mask" in b
            else b["input_ids"].new_tensor(b["input_ids"].numel())
        ),
        clip=par.clip,
        grad_scale=par.grad_scale,
        metrics=getattr(loss, "metrics", None),
    )
    result = train(
        cfg, rt, model, optimizer, scheduler, batches, fns, out, metrics, val_batches=val
    )

    final = out.checkpoints / f"step_{result.step}"
    if not result.preempted:
        final = out.root / ("adapter" if cfg.peft else "model")
        save_final(
            model, tokenizer, final, adapter=cfg.peft is not None, distributed=rt.distributed
        )
    if not result.preempted and rt.is_main:
        out.mark_finished(result.step, final)
        metrics.print(f"saved {'adapter' if cfg.peft else 'model'}: {final}")
        if t.sample_prompt:
            reply = sample(
                final, t.sample_prompt, t.sample_max_new_tokens, adapter=cfg.peft is not None
            )
            metrics.print(f"sample: {t.sample_prompt!r} -> {reply!r}")
    metrics.close()
    if rt.distributed:
        dist.barrier()
    teardown_runtime()
    return final
