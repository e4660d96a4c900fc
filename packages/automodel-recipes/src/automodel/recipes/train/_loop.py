"""The training loop shared by every recipe: accumulate, normalize by global tokens, clip, step, log.

One optimizer step reads top to bottom:

1. take ``grad_accum_steps`` micro-batches from this rank's sharded loader;
2. count the label tokens of the whole step on every rank and sum them across ranks: ``N``;
3. per micro-batch: forward, summed loss, ``backward(sum / N * grad_scale)`` — so the gradient
   is the mean over all label tokens of the global batch, however they split over micro-batches
   and ranks (``grad_scale`` undoes the data-parallel mean-reduction of FSDP/DDP);
4. clip, check finiteness (skip or stop per ``on_nonfinite``), optimizer and LR steps;
5. on log steps only: reduce the loss across ranks, print ``loss=...``, write metrics.

Checkpoints at ``checkpoint.every_steps``, on SIGTERM/SIGUSR1 (then a clean exit) and at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from automodel.recipes.config import RecipeConfig
from automodel.recipes.data import ShardedBatches, StreamingBatches
from automodel.recipes.train._metrics import MetricsLogger, format_duration
from automodel.recipes.train._output import RunDir, RunError
from automodel.recipes.train._runtime import Runtime, all_reduce_sum
from automodel.recipes.train._signals import PreemptionFlag

Batch = dict[str, torch.Tensor]


@dataclass
class StepFunctions:
    """What a recipe plugs into the loop.

    ``loss``: (model, batch) -> summed loss over the batch's label tokens (a scalar tensor).
    ``count``: batch -> number of label tokens (a scalar tensor on the batch's device).
    ``tokens``: batch -> number of input tokens processed (for tokens/s).
    ``sync_grads``: called after the last backward of a step (manual data parallel), or None.
    ``grad_scale``: multiplies the loss so data-parallel gradient averaging yields a global sum.
    ``metrics``: () -> extra scalars to log on log steps (e.g. MoE router losses), or None.
    """

    loss: Callable[[Any, Batch], torch.Tensor]
    count: Callable[[Batch], torch.Tensor]
    tokens: Callable[[Batch], torch.Tensor]
    sync_grads: Callable[[], None] | None = None
    clip: Callable[[float], torch.Tensor] | None = None
    grad_scale: float = 1.0
    metrics: Callable[[], dict[str, float]] | None = None


@dataclass
class LoopResult:
    """How the loop ended: last step done, and whether a signal stopped it early."""

    step: int
    preempted: bool = False
    skipped_steps: int = 0
    losses: dict[int, float] = field(default_factory=dict)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(
    cfg: RecipeConfig,
    rt: Runtime,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: ShardedBatches | StreamingBatches,
    fns: StepFunctions,
    run: RunDir,
    metrics: MetricsLogger,
    *,
    val_batches: ShardedBatches | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
) -> LoopResult:
    """Trains ``model`` to ``training.max_steps`` (resuming when a checkpoint exists); returns how it ended.

    Raises:
        RunError: a non-finite loss or gradient with ``on_nonfinite=stop``.
    """
    from automodel.ckpt import CheckpointManager

    t = cfg.training
    ckpts = CheckpointManager(
        run.checkpoints, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save
    )
    step = 0
    latest = ckpts.latest() if cfg.checkpoint.resume == "auto" else None
    if latest is not None:
        # Model, optimizer, LR schedule, data position and every RNG: the loss curve continues
        # exactly where it stopped.
        extra = {"scheduler": scheduler, "data": batches}
        step = ckpts.load(latest, model=model, optimizer=optimizer, extra=extra)
        metrics.print(f"resumed from {ckpts.path(step)} at step {step}")

    def save(at: int) -> None:
        path = ckpts.save(
            at, model=model, optimizer=optimizer, extra={"scheduler": scheduler, "data": batches}
        )
        metrics.print(f"checkpoint saved: {path}")

    result = LoopResult(step=step)
    if step >= t.max_steps:
        return result
    flag = PreemptionFlag().install()
    if metrics.enabled and t.progress_bar and _interactive():
        from tqdm import tqdm

        metrics.bar = tqdm(total=t.max_steps, initial=step, dynamic_ncols=True, leave=False)
    it = iter(batches)
    model.train()
    window_start, window_tokens, window_steps = (
        time.perf_counter(),
        torch.zeros((), device=rt.device),
        0,
    )
    loss_acc = torch.zeros((), device=rt.device, dtype=torch.float32)
    count_acc = torch.zeros((), device=rt.device, dtype=torch.float32)
    run_start, start_step = time.perf_counter(), step
    try:
        while step < t.max_steps:
            micro = [_to_device(next(it), rt.device) for _ in range(t.grad_accum_steps)]
            n_tokens = all_reduce_sum(sum(fns.count(b) for b in micro).float(), rt)  # type: ignore[union-attr]
            step_loss = torch.zeros((), device=rt.device, dtype=torch.float32)
            for b in micro:
                loss_sum = fns.loss(model, b)
                (loss_sum * (fns.grad_scale / n_tokens.clamp(min=1))).backward()
                step_loss += loss_sum.detach().float()
                window_tokens += fns.tokens(b)
            if fns.sync_grads is not None:
                fns.sync_grads()
            clip = t.max_grad_norm if t.max_grad_norm is not None else math.inf
            grad_norm = (
                fns.clip(clip)
                if fns.clip
                else torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            )
            step += 1
            if not (math.isfinite(float(grad_norm)) and math.isfinite(float(step_loss))):
                optimizer.zero_grad(set_to_none=True)
                if t.on_nonfinite == "stop":
                    raise RunError(
                        f"non-finite loss or gradient at step {step} (loss={float(step_loss)}, "
                        f"grad_norm={float(grad_norm)}); lower optimizer.lr, check the data, or set "
                        "training.on_nonfinite=skip"
                    )
                result.skipped_steps += 1
                metrics.print(f"step {step}: non-finite loss or gradient, optimizer step skipped")
                scheduler.step()
            else:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_acc += step_loss
                count_acc += n_tokens
            window_steps += 1
            if metrics.bar is not None:
                metrics.bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                all_reduce_sum(loss_acc, rt)
                loss = float(loss_acc / count_acc.clamp(min=1))
                elapsed = time.perf_counter() - window_start
                tokens = float(all_reduce_sum(window_tokens, rt))
                tps = tokens / max(elapsed, 1e-9)
                eta = (
                    (time.perf_counter() - run_start)
                    / max(step - start_step, 1)
                    * (t.max_steps - step)
                )
                record = {
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tps,
                    "step_time_s": elapsed / window_steps,
                }
                line = (
                    f"step {step}/{t.max_steps} loss={loss:.4f} lr={record['lr']:.2e} "
                    f"grad_norm={record['grad_norm']:.3f} tokens/s={tps:,.0f}"
                )
                if flops_per_token is not None:
                    tflops = flops_per_token * tps / rt.world_size / 1e12
                    record["tflops_per_gpu"] = tflops
                    line += f" TFLOP/s={tflops:.2f}"
                    if peak_flops:
                        record["mfu"] = tflops * 1e12 / peak_flops
                        line += f" MFU={record['mfu']:.1%}"
                if fns.metrics is not None:
                    extra = fns.metrics()
                    record.update(extra)
                    line += "".join(f" {k.split('/')[-1]}={v:.3g}" for k, v in extra.items())
                if rt.device.type == "cuda":
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    line += f" mem={record['peak_mem_gib']:.1f}GiB"
                metrics.print(line + f" eta={format_duration(eta)}")
                if metrics.bar is not None:
                    metrics.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                metrics.write(step, record)
                result.losses[step] = loss
                loss_acc.zero_()
                count_acc.zero_()
                window_tokens.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if val_batches is not None and t.val_every and step % t.val_every == 0:
                val_loss = validate(model, val_batches, fns, rt, t.val_batches)
                metrics.print(f"step {step}/{t.max_steps} val_loss={val_loss:.4f}")
                metrics.write(step, {"loss": val_loss}, prefix="val_")
                model.train()
            ckpt_due = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if cfg.checkpoint.enabled and ckpt_due and step < t.max_steps:
                save(step)
            if flag.should_stop(rt.distributed):
                if cfg.checkpoint.enabled:
                    save(step)
                metrics.print(f"received {flag.name}: checkpoint saved at step {step}; exiting")
                result.preempted = True
                break
        else:
            if cfg.checkpoint.enabled:
                save(step)
        ckpts.wait()
    finally:
        flag.uninstall()
        if metrics.bar is not None:
            metrics.bar.close()
            metrics.bar = None
    result.step = step
    return result


@torch.no_grad()
def validate(model: Any, batches: ShardedBatches, fns: StepFunctions, rt: Runtime, n: int) -> float:
    """Returns the mean loss per label token over ``n`` validation batches (all ranks)."""
    model.eval()
    batches.load_state_dict({"epoch": 0, "position": 0})
    it = iter(batches)
    total = torch.zeros((), device=rt.device)
    count = torch.zeros((), device=rt.device)
    for _ in range(min(n, batches.batches_per_epoch)):
        b = _to_device(next(it), rt.device)
        total += fns.loss(model, b).float()
        count += fns.count(b).float()
    all_reduce_sum(total, rt)
    all_reduce_sum(count, rt)
    return float(total / count.clamp(min=1))


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()
