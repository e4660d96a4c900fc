"""Training step of a Qwen3-30B-A3B-shaped MoE (fewer layers): automodel vs its peers, 1 to 4 GPUs.

    # on a GPU machine, from the repository root (packages need not be installed):
    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/moe_bench.py
    # one variant by hand, or another size:
    python benchmarks/moe_bench.py --variant automodel --layers 4 --seq 2048
    # check the script itself (tiny shape, CPU fp32, EP over gloo; every variant, 2 steps):
    uv run python benchmarks/moe_bench.py --smoke

Variants, each in its own subprocess with its own timeout (``--timeout``, default 150 s, plus
whatever the variants before it left unused; a crash, OOM or hang in one does not stop the
others). NeMo's process starts with the first variant and imports (minutes of start-up) while the
others run; it builds and measures only at its turn, alone on the GPU. Every model is built
directly on its device (``with torch.device("cuda")``: random init on the GPU, in bf16), never on
the CPU first. ``--profile`` adds, per 1-GPU variant, the phase times, the host syncs and a
``torch.profiler`` kernel table of one more step (``<variant>.json.profile.txt``):

- ``automodel``: ``automodel.core.AutoModelForCausalLM.from_config(config, dtype=bf16)``: the
  kernel-patched transformers class, its experts run as grouped GEMMs (``torch._grouped_mm``).
- ``transformers``: ``transformers.AutoModelForCausalLM.from_config(config, dtype=bf16)`` as
  shipped; the experts implementation it picked is recorded in the row.
- ``nemo``: NeMo AutoModel 0.7.0, ``NeMoAutoModelForCausalLM.from_config(config,
  dtype=bf16)`` under the same device context; its forward returns logits only, so the loss is
  the same shifted cross-entropy computed here in fp32. Skipped, with the import error as the note,
  when absent. ``$NEMO_SITE`` (and ``$LIGER_SITE``) are prepended to ``PYTHONPATH`` only in its
  subprocess.
- ``ep2``, ``ep4``: automodel with expert parallelism over 2 / 4 GPUs through ``torchrun``:
  ``from_config(config, parallel=ParallelConfig(dp_shard=-1, ep=N))`` (experts sharded over the
  ``ep`` ranks, FSDP2 over the same ranks for the rest), a different batch per rank; tokens/s is
  per GPU and peak memory the largest of the ranks. Skipped when fewer GPUs are visible.
- ``transformers_eager_loop``: transformers with ``experts_implementation="eager"`` (its Python
  loop over the experts hit); last, the slowest.

Model: Qwen3-30B-A3B shape (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 heads x 128
head_dim, 4 KV heads, vocab 151936, untied) with ``--layers`` (default 8) decoder layers, random
init (seed 0; automodel and transformers build the same weights, so their first losses agree),
bf16 parameters, AdamW (fused on CUDA, every variant), seq 4096 x batch 1, 3 warm-up + 8 timed steps.
MFU: see :func:`active_flops_per_token` (BENCHMARKS.md convention, active experts only);
peak 989 TFLOP/s (H100 SXM / H200 dense bf16).

Writes ``$OUT/moe_bench.json`` when ``OUT`` is set (variant logs under ``$OUT/moe_logs/``) and
prints one markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

VARIANTS = [
    "automodel",
    "transformers",
    "nemo",
    "ep2",
    "ep4",
    "transformers_eager_loop",
]
EP_SIZES = {"ep2": 2, "ep4": 4}
PEAK_TFLOPS = 989.0
SHAPE: dict[str, Any] = dict(  # Qwen3-30B-A3B, all layers MoE
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,  # dense MLP width: unused, every layer is sparse
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=False,
    output_router_logits=False,
    router_aux_loss_coef=0.001,
    use_cache=False,
)
SMOKE_SHAPE: dict[str, Any] = {
    **SHAPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def active_flops_per_token(config: Any, seq_len: int) -> float:
    """Returns training FLOPs per token of a MoE decoder, counting only the ACTIVE experts.

    BENCHMARKS.md convention: ``6 x N_active + 12 x layers x attn_width x seq_len``, where
    ``N_active`` is the matmul parameters one token goes through:

    - attention: ``hidden x head_dim x (2 x heads + 2 x kv_heads)`` (q, o and k, v projections);
    - MoE MLP: ``3 x hidden x moe_intermediate x top_k`` (gate, up, down of the top_k experts it
      is routed to) plus the router ``hidden x num_experts``;
    - the LM head ``vocab x hidden`` (input embedding excluded: a lookup; untied here).

    ``attn_width`` is ``heads x head_dim`` (4096 for Qwen3-30B-A3B, twice its hidden size), the
    width the QK^T and PV products actually run at. No causal discount, no recompute. This
    matches ``automodel.core.flops_per_token``, which the smoke run checks.

    Example (Qwen3-30B-A3B shape, 8 layers, seq 4096): about 6.2 GFLOP/token.
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    layers = config.num_hidden_layers
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    moe = (
        3 * hidden * config.moe_intermediate_size * config.num_experts_per_tok
        + hidden * config.num_experts
    )
    lm_head = config.vocab_size * hidden
    n_active = layers * (attention + moe) + lm_head
    return float(6 * n_active + 12 * layers * heads * head_dim * seq_len)


class _Skip(Exception):
    """The variant cannot run here (missing package, option or GPUs); its message is the note."""


def _build(variant: str, config: Any, dtype: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """Returns (model built on ``device`` in ``dtype``, extra fields for the result row)."""
    import torch
    import transformers

    info: dict[str, Any] = {}
    if variant.startswith("transformers"):
        kwargs: dict[str, Any] = {"dtype": dtype}
        if variant == "transformers_eager_loop":
            kwargs["experts_implementation"] = "eager"
        with device:
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
            except TypeError as exc:  # a transformers without experts_implementation
                if "experts_implementation" not in kwargs:
                    raise
                raise _Skip(f"transformers {transformers.__version__}: {exc}") from exc
        info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
        info["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        return model, info
    if variant == "nemo":
        try:
            from nemo_automodel import NeMoAutoModelForCausalLM
        except Exception as exc:  # any import failure: not available here
            raise _Skip(f"{type(exc).__name__}: {exc}") from exc
        with device:
            try:
                model = NeMoAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            except Exception as exc:
                text = str(exc).lower()
                if not any(w in text for w in ("process group", "distributed", "init_process")):
                    raise
                _init_single_rank()  # its MoE wants a process group: give it a 1-rank one
                model = NeMoAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
                info["note"] = "1-rank process group initialized"
        model = model.to(device=device)  # NeMo may keep some buffers on the CPU
        backend = getattr(model, "backend", None)
        if backend is not None:
            info["nemo_backend"] = (
                f"experts={getattr(backend, 'experts', '?')}, "
                f"dispatcher={getattr(backend, 'dispatcher', '?')}, "
                f"attn={getattr(backend, 'attn', '?')}, linear={getattr(backend, 'linear', '?')}"
            )
        return model, info
    from automodel.core import AutoModelForCausalLM
    from automodel.core.moe import is_experts_module

    parallel = None
    if variant in EP_SIZES:
        from automodel.parallel import ParallelConfig

        parallel = ParallelConfig(dp_shard=-1, ep=EP_SIZES[variant])
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, parallel=parallel)
    experts = [m for m in model.modules() if is_experts_module(m)]
    grouped = sum(bool(getattr(m, "_automodel_grouped", False)) for m in experts)
    info["note"] = f"{grouped}/{len(experts)} experts modules grouped by from_config"
    if parallel is not None:
        info["note"] = (
            f"ep={EP_SIZES[variant]} x fsdp over {EP_SIZES[variant]} GPUs; experts run by "
            f"automodel.parallel's all-to-all forward ({grouped}/{len(experts)} grouped)"
        )
    return model, info


def _init_single_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if _cuda() else "gloo", rank=0, world_size=1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _loss(model: Any, ids: Any, variant: str) -> Any:
    import torch.nn.functional as F

    if variant != "nemo":
        return model(input_ids=ids, labels=ids).loss
    # NeMo's forward takes no labels (they would reach attention) and returns logits only:
    # transformers' shifted cross-entropy, in fp32.
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _init_ep(variant: str, smoke: bool) -> tuple[int, int]:
    """Initializes the process group of an ``epN`` variant under torchrun; returns (rank, world)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != EP_SIZES[variant]:
        raise RuntimeError(f"{variant} must run under torchrun with {EP_SIZES[variant]} ranks")
    rank = int(os.environ["RANK"])
    if not smoke:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo" if smoke else "nccl")
    return rank, world


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Returns the measured row of one variant (run in its own process; None on ranks > 0)."""
    import torch
    import transformers

    rank, world = _init_ep(variant, args.smoke) if variant in EP_SIZES else (0, 1)
    shape = {**(SMOKE_SHAPE if args.smoke else SHAPE), "num_hidden_layers": args.layers}
    if args.smoke:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = transformers.Qwen3MoeConfig(**shape)
    row: dict[str, Any] = {"variant": variant, "transformers": transformers.__version__}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = _build(variant, config, dtype, device)
    row.update(info)
    model.train()
    row["build_s"] = time.perf_counter() - t0
    print(f"[{variant}] built in {row['build_s']:.1f} s", flush=True)
    row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9  # local shards under EP
    fused = device.type == "cuda"  # fused AdamW takes DTensors too (EP, FSDP)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    gen = torch.Generator(device="cpu").manual_seed(rank)  # rank 0 sees the 1-GPU batch
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = deadline = 0.0
    warmup, steps_done = args.warmup, 0
    step = 0
    while steps_done < args.steps:
        if step == warmup:
            sync()
            start = time.perf_counter()
            deadline = start + args.budget
        t_step = time.perf_counter()
        loss = _loss(model, ids, variant)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step < warmup and world == 1:
            sync()
            if time.perf_counter() - t_step > args.budget / 4:
                warmup = step + 1  # a slow variant: one warm-up step is enough
        if rank == 0:  # progress in the log: where a variant that timed out spent its time
            print(f"[{variant}] step {step} issued at {time.perf_counter() - t0:.1f} s", flush=True)
        if step >= warmup:
            steps_done += 1
            if world == 1 and time.perf_counter() > deadline:
                break  # a slow variant still reports what it measured within its budget
        step += 1
    sync()
    elapsed = time.perf_counter() - start
    tokens_s = args.batch * args.seq * steps_done / elapsed
    if args.profile and world == 1 and device.type == "cuda":
        row.update(_profile(lambda: _loss(model, ids, variant), optim, variant, args))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    if world > 1:
        import torch.distributed as dist

        stats = torch.tensor([peak, -tokens_s], device=device, dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the largest peak, the slowest rank
        peak, tokens_s = float(stats[0]), -float(stats[1])
        dist.destroy_process_group()
        if rank != 0:
            return None
    flops = active_flops_per_token(config, args.seq)
    row.update(
        tokens_s=tokens_s,
        gpus=world,
        steps_timed=steps_done,
        warmup_steps=warmup,
        mfu=flops * tokens_s / (PEAK_TFLOPS * 1e12),
        gflop_per_token=flops / 1e9,
        peak_gib=peak,
        first_loss=float(losses[0]),
        last_loss=float(losses[-1]),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    if args.smoke:  # the bench's own FLOP count agrees with the library's
        from automodel.core import flops_per_token

        assert abs(flops_per_token(config, args.seq) - flops) < 1e-6 * flops, "FLOP count differs"
    return row


def _profile(loss_fn: Any, optim: Any, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Returns the phase times of one more step; writes its kernel tables and host syncs to a file.

    Three extra steps after the timed ones: one timed per phase with CUDA events (forward,
    backward, optimizer, in ms), one under ``torch.cuda.set_sync_debug_mode("warn")`` whose
    warnings (one per host sync) are counted by Python source line, and one under
    ``torch.profiler`` whose aten ops and kernels are tabled by self device time. The text goes to
    ``<result>.profile.txt`` next to the variant's result.
    """
    import collections
    import warnings

    import torch
    from torch.autograd import DeviceType

    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    events[0].record()
    loss = loss_fn()
    events[1].record()
    saved_gib = (torch.cuda.memory_allocated() - base) / 2**30  # activations kept for backward
    loss.backward()
    events[2].record()
    optim.step()
    optim.zero_grad(set_to_none=True)
    events[3].record()
    torch.cuda.synchronize()
    phases: dict[str, float] = {
        f"{name}_ms": events[i].elapsed_time(events[i + 1])
        for i, name in enumerate(("forward", "backward", "optimizer"))
    }
    phases["saved_activations_gib"] = saved_gib
    phases["profiled_step_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    syncs: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_fn().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optim.zero_grad(set_to_none=True)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        loss_fn().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    ops = [e for e in averages if e.device_type != DeviceType.CUDA and e.self_device_time_total > 0]
    total_us = sum(e.self_device_time_total for e in kernels)
    lines = [
        f"# {variant}: one step, {args.layers} layers, seq {args.seq}; phases {phases}",
        f"# device time of all kernels: {total_us / 1e3:.1f} ms",
        f"# host syncs in one forward+backward: {sum(syncs.values())} {dict(syncs.most_common(20))}",
        "\n## aten ops by self device time (ms, calls)",
    ]
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:45]:
        lines.append(f"{e.self_device_time_total / 1e3:9.2f} {e.count:6d}  {e.key[:110]}")
    lines.append("\n## ops by self CPU time (ms, calls): what the host spends issuing the step")
    cpu_ops = [e for e in averages if e.device_type != DeviceType.CUDA]
    for e in sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:30]:
        lines.append(f"{e.self_cpu_time_total / 1e3:9.2f} {e.count:6d}  {e.key[:110]}")
    lines.append("\n## kernels by device time (ms, calls)")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:45]:
        lines.append(f"{e.self_device_time_total / 1e3:9.2f} {e.count:6d}  {e.key[:140]}")
    Path(f"{args.result}.profile.txt").write_text("\n".join(lines) + "\n")
    return {**phases, "host_syncs": sum(syncs.values()), "kernel_ms": total_us / 1e3}


def _child(args: argparse.Namespace) -> None:
    result = Path(args.result)
    if args.go_file:
        _wait_for_go(args.variant, args.go_file)
    try:
        row = run_variant(args.variant, args)
    except _Skip as exc:
        row = {"variant": args.variant, "skipped": str(exc)}
    except Exception as exc:  # reported in the table, traceback in the log
        traceback.print_exc()
        kind = "OOM" if "out of memory" in str(exc).lower() else type(exc).__name__
        row = {"variant": args.variant, "error": f"{kind}: {str(exc).splitlines()[0][:160]}"}
        if int(os.environ.get("RANK", "0")) != 0:
            row = None
    if row is not None:
        result.write_text(json.dumps(row, indent=2))
        print(json.dumps(row))


def _child_env(variant: str) -> dict[str, str]:
    env = dict(os.environ)
    if variant == "nemo":
        extra = [os.environ[k] for k in ("NEMO_SITE", "LIGER_SITE") if os.environ.get(k)]
        if extra:
            env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            )
    return env


def _visible_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _command(variant: str, args: argparse.Namespace, result: Path, port: int) -> list[str]:
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("layers", "seq", "batch", "warmup", "steps", "budget")
    ]
    passthrough += ["--smoke"] if args.smoke else []
    passthrough += ["--profile"] if args.profile else []
    script = [__file__, "--variant", variant, f"--result={result}", *passthrough]
    if variant not in EP_SIZES:
        return [sys.executable, *script]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1"]
    launcher += [f"--nproc_per_node={EP_SIZES[variant]}", f"--master_port={port}"]
    return [*launcher, *script]


def _run_with_timeout(cmd: list[str], log: Any, timeout: float, env: dict[str, str]) -> int | str:
    """Returns the exit code of ``cmd``, or a note after killing its whole process group."""
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too: they hold the GPUs
        proc.wait()
        return f"timeout after {timeout:.0f} s"


def _cell(row: dict[str, Any]) -> str:
    name = row["variant"]
    if "skipped" in row:
        return f"| {name} | skipped: {row['skipped'][:160]} | | | | | |"
    if "error" in row:
        return f"| {name} | failed: {row['error']} | | | | | |"
    note = "; ".join(
        str(row[k])
        for k in ("experts_implementation", "nemo_backend", "note", "transformers")
        if row.get(k)
    )
    if "forward_ms" in row:  # --profile
        note += (
            f"; step ms fwd {row['forward_ms']:.1f} / bwd {row['backward_ms']:.1f} / optim "
            f"{row['optimizer_ms']:.1f}, kernels {row['kernel_ms']:.1f}, "
            f"{row['host_syncs']} host syncs, activations {row['saved_activations_gib']:.1f} GiB"
        )
    return (
        f"| {name} | {row['gpus']} | {row['tokens_s']:,.0f} | {100 * row['mfu']:.1f}% "
        f"| {row['peak_gib']:.1f} | {row['first_loss']:.4f} -> {row['last_loss']:.4f} | {note} |"
    )


def _ratios(rows: list[dict[str, Any]]) -> str:
    ran = {r["variant"]: r for r in rows if "tokens_s" in r}
    sentences = []
    for name in ("automodel",):
        ours = ran.get(name)
        if ours is None:
            continue
        parts = []
        for peer in ("nemo", "transformers", "transformers_eager_loop"):
            if peer in ran:
                speed = ours["tokens_s"] / ran[peer]["tokens_s"]
                memory = ours["peak_gib"] / ran[peer]["peak_gib"] if ran[peer]["peak_gib"] else 0.0
                parts.append(f"vs {peer}: {speed:.2f}x tokens/s at {memory:.2f}x peak memory")
        if parts:
            sentences.append(f"{name} " + "; ".join(parts) + ".")
    return " ".join(sentences) if sentences else "automodel or its peers did not run: no ratios."


PRESTART = ("nemo",)  # variants whose process starts early (slow imports), gated by a go-file


def _skip_reason(
    variant: str, args: argparse.Namespace, gpus: int, rows: list[dict[str, Any]]
) -> str | None:
    """Returns why ``variant`` cannot run here (the row's note), or None when it can."""
    if variant in EP_SIZES and not args.smoke and gpus < EP_SIZES[variant]:
        return f"{gpus} GPU(s) visible"
    if variant in EP_SIZES and args.smoke and EP_SIZES[variant] > 2:
        return "smoke runs ep2 only (2 CPU ranks)"
    shipped = next((r for r in rows if r["variant"] == "transformers" and "tokens_s" in r), None)
    loop_default = shipped is not None and shipped.get("experts_implementation") in (None, "eager")
    if variant == "transformers_eager_loop" and loop_default:
        return "the transformers row already runs the eager loop (its default)"
    return None


class _Prestarted:
    """A variant's process started ahead of its turn: it imports, then waits for a go-file."""

    def __init__(self, variant: str, args: argparse.Namespace, logs: Path) -> None:
        self.variant = variant
        self.go_file = logs / f"{variant}.go"
        self.go_file.unlink(missing_ok=True)
        result = logs / f"{variant}.json"
        result.unlink(missing_ok=True)
        cmd = [*_command(variant, args, result, port=29590), f"--go-file={self.go_file}"]
        self.log = open(logs / f"{variant}.log", "w")  # noqa: SIM115 (closed in go/kill)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=_child_env(variant),
            start_new_session=True,
        )

    def go(self, timeout: float) -> int | str:
        """Returns the exit code once the process ran its turn, or a note after killing it."""
        self.go_file.touch()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"timeout after {timeout:.0f} s (imports ran before its turn)"
        finally:
            self.log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def _wait_for_go(variant: str, go_file: str) -> None:
    """Imports what ``variant`` needs, then blocks until ``go_file`` exists (its turn)."""
    t0 = time.perf_counter()
    if variant == "nemo":
        try:
            import nemo_automodel  # noqa: F401
        except Exception as exc:  # reported by _build, which imports it again
            print(f"[{variant}] import failed: {exc}", flush=True)
    print(
        f"[{variant}] imported in {time.perf_counter() - t0:.1f} s; waiting for its turn",
        flush=True,
    )
    while not Path(go_file).exists():
        time.sleep(0.2)
    print(f"[{variant}] its turn after {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run only this one, in-process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed steps after which a 1-GPU variant stops early (default 60)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 2 steps")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="1-GPU variants: 3 more steps for phase times, host syncs and a torch.profiler "
        "kernel table (<variant>.json.profile.txt in the log folder); needs CUDA",
    )
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--go-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (2, 32, 1, 1, 2, 60.0) if args.smoke else (8, 4096, 1, 3, 8, 60.0)
    names = ("layers", "seq", "batch", "warmup", "steps", "budget")
    for name, value in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.variant:
        if args.result is None:
            args.result = os.devnull
        _child(args)
        return

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    logs = out / "moe_logs" if out else Path(tempfile.mkdtemp(prefix="moe_bench_"))
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _visible_gpus()
    rows: list[dict[str, Any]] = []
    variants = [v for v in args.variants.split(",") if v]
    # NeMo's import and kernel-backend start-up take minutes: its process starts now, imports
    # while the other variants run, and builds its model only when its turn comes.
    early = {v: _Prestarted(v, args, logs) for v in variants if v in PRESTART and len(variants) > 1}
    spare = 0.0  # seconds a variant left unused carry over to the next ones
    try:
        for i, variant in enumerate(variants):
            skip = _skip_reason(variant, args, gpus, rows)
            if skip:
                rows.append({"variant": variant, "skipped": skip})
                continue
            result = logs / f"{variant}.json"
            log = logs / f"{variant}.log"
            allowed = args.timeout + spare
            print(f"[moe_bench] {variant} (up to {allowed:.0f} s) ...", flush=True)
            started = time.monotonic()
            if variant in early:
                code = early.pop(variant).go(allowed)
            else:
                result.unlink(missing_ok=True)
                cmd = _command(variant, args, result, port=29600 + i)
                with open(log, "w") as fh:
                    code = _run_with_timeout(cmd, fh, allowed, _child_env(variant))
            spare = max(0.0, allowed - (time.monotonic() - started))
            if result.exists():
                row = json.loads(result.read_text())
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
                row = {"variant": variant, "error": f"exit {code}: {tail[0][:160]}"}
            rows.append(row)
            print(f"[moe_bench] {variant}: {json.dumps(row)}", flush=True)
    finally:
        for waiting in early.values():  # a variant that never got its turn
            waiting.kill()

    ran = [r for r in rows if "tokens_s" in r]
    first = [r["first_loss"] for r in ran if r["variant"] != "nemo"]  # NeMo inits differently
    spread = max(first) - min(first) if first else 0.0
    meta = {
        "shape": {**(SMOKE_SHAPE if args.smoke else SHAPE), "num_hidden_layers": args.layers},
        "seq": args.seq,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "peak_tflops": PEAK_TFLOPS,
        "first_loss_spread": spread,
        "rows": rows,
    }
    if out is not None:
        (out / "moe_bench.json").write_text(json.dumps(meta, indent=2))
    gflop = ran[0]["gflop_per_token"] if ran else float("nan")
    print(
        f"\nQwen3-30B-A3B shape, {args.layers} layers, seq {args.seq} x batch {args.batch} per GPU,"
        f" {'fp32 CPU smoke' if args.smoke else 'bf16'}, AdamW, {args.warmup}+{args.steps} steps "
        f"(1-GPU variants stop timing after {args.budget:.0f} s). tokens/s is per GPU. "
        f"MFU = {gflop:.2f} GFLOP/token (6 x ACTIVE matmul params + 12 x layers x heads x head_dim"
        f" x seq, BENCHMARKS.md) x tokens/s / {PEAK_TFLOPS:.0f} TFLOP/s. First-step loss spread "
        f"across automodel/transformers variants: {spread:.4f} (same seed and weights: ~0). "
        f"{_ratios(rows)}"
    )
    print("\n| variant | GPUs | tokens/s/GPU | MFU | peak GiB | loss first -> last | notes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(_cell(r) for r in rows))


if __name__ == "__main__":
    main()
