"""Benchmark: training-step speed on synthetic tokens (tokens/s, TFLOP/s, MFU, peak memory).

    automodel benchmark                                  # bundled tiny model, CPU or GPU
    automodel run examples/benchmark_llama3_2_1b.yaml --nproc-per-node 8

Random token ids (no data loading in the measurement), the real model, optimizer and parallelism
from the config. After ``benchmark.warmup_steps``, every ``benchmark.window`` steps print one row;
the table at the end repeats them. MFU uses ``train/_flops.py``'s documented formula and the
device's dense bf16 peak (``benchmark.peak_tflops`` to override). Nothing is saved.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from automodel.recipes._components import build_optimizer
from automodel.recipes._fp8 import apply_fp8, check_fp8
from automodel.recipes._lm_loss import CausalLMLoss
from automodel.recipes._model_io import _load_model
from automodel.recipes.config import RecipeConfig
from automodel.recipes.train import build_scheduler, setup_runtime, teardown_runtime
from automodel.recipes.train._data_parallel import describe, parallelize_for_training
from automodel.recipes.train._flops import flops_per_token, peak_flops


def run(cfg: RecipeConfig) -> Path:
    """Runs the benchmark per ``cfg``; prints one row per window and a markdown table; returns output_dir."""
    t, b = cfg.training, cfg.benchmark
    rt = setup_runtime(t.device)
    check_fp8(cfg.fp8, rt.device)  # fail in a second, not after loading the model
    say = print if rt.is_main else (lambda *a, **k: None)
    torch.manual_seed(t.seed)
    model = _load_model(cfg.model, device=rt.device).to(rt.device)
    model = apply_fp8(model, cfg.fp8, rt.device, say)
    fpt = flops_per_token(model, b.seq_len)  # before sharding: counts full matrices
    par = parallelize_for_training(model, cfg.parallel, rt)
    model, rt = par.model, par.runtime
    if t.compile:
        model.compile()
    optimizer = build_optimizer(cfg, model, rt.device)
    loss_fn = CausalLMLoss(cfg, model)
    scheduler = build_scheduler(optimizer, t.max_steps, cfg.lr_scheduler)
    peak = peak_flops(rt.device, b.peak_tflops)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator(device="cpu").manual_seed(t.seed + rt.rank)
    say(f"benchmark {cfg.model.name_or_path}: {describe(model)}, seq {b.seq_len} x micro "
        f"{t.micro_batch_size} x accum {t.grad_accum_steps} x {rt.dp_size} ranks on {rt.device}")  # fmt: skip
    say(f"FLOPs/token = 6 x matmul params + 12 x layers x attn width x seq = {fpt / 1e9:.3f} GFLOP")

    rows = []
    model.train()
    cuda = rt.device.type == "cuda"
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * b.seq_len
    step, total = 0, b.warmup_steps + t.max_steps
    while step < total:
        if step == b.warmup_steps or (
            step > b.warmup_steps and (step - b.warmup_steps) % b.window == 0
        ):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            window_start, window_first = time.perf_counter(), step
        for _ in range(t.grad_accum_steps):
            ids = torch.randint(0, vocab, (t.micro_batch_size, b.seq_len + 1), generator=gen).to(
                rt.device
            )
            ce = loss_fn(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
            # Mean over the global batch; grad_scale undoes FSDP's average over ranks.
            (ce * (par.grad_scale / (tokens_per_step * rt.dp_size))).backward()
            last_loss = ce.detach() / ids[:, 1:].numel()
        par.clip(t.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        measured = step - b.warmup_steps
        if measured > 0 and (measured % b.window == 0 or step == total):
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - window_start
            n = step - window_first
            tps = tokens_per_step * n / seconds  # per rank
            row = {
                "steps": f"{window_first - b.warmup_steps + 1}-{measured}",
                "tokens_per_s_per_rank": tps,
                "tflops_per_rank": fpt * tps / 1e12,
                "mfu": fpt * tps / peak if peak else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "loss": float(last_loss),
            }
            rows.append(row)
            say(_line(row))
    say("")
    say("| steps | tokens/s/rank | TFLOP/s/rank | MFU | peak GiB |")
    say("|---|---|---|---|---|")
    for row in rows:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a (no peak)"
        mem = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] is not None else "n/a (CPU)"
        say(
            f"| {row['steps']} | {row['tokens_per_s_per_rank']:,.0f} | {row['tflops_per_rank']:.3f} | {mfu} | {mem} |"
        )
    if rt.distributed:
        dist.barrier()
    teardown_runtime()
    return Path(t.output_dir)


def _line(row: dict[str, Any]) -> str:
    mfu = f" MFU={row['mfu']:.1%}" if row["mfu"] is not None else ""
    mem = f" mem={row['peak_mem_gib']:.2f}GiB" if row["peak_mem_gib"] is not None else ""
    return (
        f"steps {row['steps']}: loss={row['loss']:.4f} tokens/s/rank={row['tokens_per_s_per_rank']:,.0f} "
        f"TFLOP/s/rank={row['tflops_per_rank']:.3f}{mfu}{mem}"
    )
