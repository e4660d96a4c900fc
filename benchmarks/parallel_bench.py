"""Tokens/s and peak memory per GPU of an 8B-shaped Llama on 4 GPUs, automodel-parallel vs torch.

    # on a 4-GPU machine, from the repository root (packages need not be installed):
    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/parallel_bench.py
    # one variant by hand:
    torchrun --nproc-per-node 4 benchmarks/parallel_bench.py --variant fsdp_tp2

Variants, each in its own torchrun job (a crash or OOM in one does not stop the others):

- ``torch_fsdp2``: the baseline, a plain FSDP2 loop over the transformers model
  (``fully_shard`` per decoder layer and the root), no automodel code.
- ``fsdp``: ``parallelize(model, ParallelConfig(dp_shard=4))``.
- ``fsdp_tp2``: ``ParallelConfig(dp_shard=2, tp=2, sequence_parallel=True)``.
- ``fsdp_pp2``: ``ParallelConfig(dp_shard=2, pp=2)``, 1F1B over 2 microbatches, each stage
  parallelized with FSDP2 (``pipeline(..., parallelize_fn=parallelize)``).

Model: Llama-3.1-8B shape (hidden 4096, FFN 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256,
untied), built on meta, parallelized there, then initialized shard by shard on the GPU in bf16;
bf16 parameters, FSDP mixed precision bf16 compute / fp32 reduce, AdamW, SDPA attention, no
activation checkpointing (about 50 GiB per GPU expected), seq 4096, 3 warm-up + 10 timed steps,
each variant in its own torchrun job with a timeout (``--timeout``, 150 s). Every variant
processes as many sequences per step as there are GPUs: a data-parallel rank that spans 2 GPUs
(a TP pair, or a pipeline of 2 stages as 2 microbatches) takes 2 sequences.

MFU (BENCHMARKS.md convention): 6 x matmul params (lm_head in, embedding out) + 12 x layers x
hidden x seq FLOPs per token; 989 TFLOP/s peak (H100 SXM / H200 dense bf16).

``--smoke`` runs every variant on CPU (gloo) with a tiny shape, to check the script itself.

Writes ``$OUT/parallel_<variant>.json`` and ``.log`` (or ./bench_out) and prints one markdown
table last.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ["torch_fsdp2", "fsdp", "fsdp_tp2", "fsdp_pp2"]
SEQ, WARMUP, STEPS, PEAK_TFLOPS = 4096, 3, 10, 989.0
SHAPE = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    use_cache=False,
)


def _flops_per_token(shape: dict, seq: int) -> float:
    h, f, layers, v = (
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_hidden_layers"],
        shape["vocab_size"],
    )
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f  # q, o, k, v, gate/up/down
    matmul_params = layers * per_layer + h * v  # lm_head in, embedding out (untied)
    return 6 * matmul_params + 12 * layers * h * seq


SMOKE_SHAPE = dict(
    SHAPE,
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _init_weights(modules: list[Any], config: Any, device: Any) -> None:
    """Materializes meta ``modules`` on ``device``: random matrices, unit norms, fresh rotary tables.

    Each rank fills its own shards (values differ across ranks; a throughput benchmark does not
    care), so no full-size tensor is ever built.
    """
    import torch
    from torch.distributed.tensor import DTensor

    for module in modules:
        module.to_empty(device=device)
    with torch.no_grad():
        seen: set[int] = set()
        for module in modules:
            for param in module.parameters():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                local = param.to_local() if isinstance(param, DTensor) else param
                if param.ndim >= 2:
                    local.normal_(0.0, 0.02)
                else:
                    local.fill_(1.0)
            for sub in module.modules():
                # rotary inv_freq buffers are not parameters: recompute them from the config
                if "inv_freq" in sub._buffers:
                    with torch.device("cpu"):
                        fresh = type(sub)(config)
                    for name, buf in fresh.named_buffers(recurse=False):
                        sub._buffers[name] = buf.to(device)


def _run_variant(variant: str, smoke: bool) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig

    from automodel.parallel import ParallelConfig, build_mesh, init_distributed, parallelize

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    shape, seq = (SMOKE_SHAPE, 64) if smoke else (SHAPE, SEQ)
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    # Built on meta (no memory), parallelized there, then materialized shard by shard on device.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.train()

    if variant == "torch_fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        dp_size, dp_rank, microbatches = world, rank, 1
        modules, schedule = [model], None
    else:
        common = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
        if variant == "fsdp_pp2":
            from automodel.parallel.pipeline import pipeline

            pconf = ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=2, **common)
            mesh = build_mesh(pconf, device_type=device.type)
            modules, schedule = pipeline(
                model, pconf, mesh, parallelize_fn=lambda m: parallelize(m, pconf, mesh)
            )
            microbatches = 2
        else:
            sizes = {"fsdp": {}, "fsdp_tp2": {"tp": 2, "sequence_parallel": True}}[variant]
            pconf = ParallelConfig(**sizes, **common)
            mesh = build_mesh(pconf, device_type=device.type)
            parallelize(model, pconf, mesh)
            modules, schedule, microbatches = [model], None, 1
        dp_size, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    _init_weights(modules, config, device)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    # One sequence per GPU per step: a dp rank gets (GPUs per dp rank) sequences.
    per_dp = world // dp_size
    assert per_dp % microbatches == 0, (per_dp, microbatches)
    gen = torch.Generator(device="cpu").manual_seed(1234 + dp_rank)

    def step() -> torch.Tensor:
        ids = torch.randint(0, shape["vocab_size"], (per_dp, seq), generator=gen).to(device)
        if schedule is not None:
            loss = schedule.step(ids, ids)
            if loss is None:  # a rank without the last stage
                loss = torch.tensor(float("-inf"), device=device)
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    warmup, steps = (1, 2) if smoke else (WARMUP, STEPS)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]  # no host sync inside the timed loop
    sync()
    elapsed = time.perf_counter() - start
    last_loss = losses[-1].clone()
    dist.all_reduce(last_loss, op=dist.ReduceOp.MAX)  # from a rank holding the last stage
    tokens = per_dp * seq * dp_size * steps  # global tokens processed
    tps_gpu = tokens / elapsed / world
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result = {
        "variant": variant,
        "tokens_per_s_per_gpu": tps_gpu,
        "mfu": tps_gpu * _flops_per_token(shape, seq) / (PEAK_TFLOPS * 1e12),
        "peak_gib": peak.item(),
        "step_s": elapsed / steps,
        "last_loss": last_loss.item(),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_job(cmd: list[str], log: Path, timeout: float) -> str:
    """Runs ``cmd`` in its own process group; returns "" on success, else why it failed."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f}s"
    return "" if code == 0 else f"exit {code}"


def _orchestrate(variants: list[str], nproc: int, smoke: bool, timeout: float) -> None:
    out = Path(os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    env_note = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    for variant in variants:
        log = out / f"parallel_{variant}.log"
        result_file = out / f"parallel_{variant}.json"
        result_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={_free_port()}", __file__, "--variant", variant,
            "--result", str(result_file),
        ] + (["--smoke"] if smoke else [])  # fmt: skip
        start = time.time()
        failure = _run_job(cmd, log, timeout)
        if not failure and result_file.exists():
            row = json.loads(result_file.read_text())
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            row = {"variant": variant, "error": f"{failure or 'no result'}: " + " | ".join(tail)}
            row["error"] = row["error"][-300:].replace("|", "/")
        row["wall_s"] = time.time() - start
        rows.append(row)
        print(f"{variant}: done in {row['wall_s']:.0f}s", flush=True)
    (out / "parallel_bench.json").write_text(json.dumps(rows, indent=1))
    base = next((r for r in rows if r["variant"] == "torch_fsdp2" and "error" not in r), None)
    shape = "tiny smoke shape on CPU" if smoke else f"Llama-3.1-8B shape, seq {SEQ}"
    lines = [
        f"{shape}, {nproc} ranks, bf16 params, fp32 reduce, AdamW, no activation checkpointing, "
        f"{WARMUP} warm-up + {STEPS} timed steps, {env_note}; MFU = 6 x matmul params + "
        f"12 x L x H x S per token over {PEAK_TFLOPS:.0f} TFLOP/s",
        "",
        "| variant | tokens/s/GPU | vs torch FSDP2 | MFU | peak GiB | step s | loss | wall s | GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['variant']} | failed: {r['error']} | | | | | | {r['wall_s']:.0f} | |"
            )
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {r['mfu']:.1%} | "
            f"{r['peak_gib']:.1f} | {r['step_s']:.2f} | {r['last_loss']:.3f} | "
            f"{r['wall_s']:.0f} | {r['gpu']} |"
        )
    table = "\n".join(lines)
    (out / "parallel_bench.md").write_text(_document_header(nproc, smoke) + table + "\n")
    print(table)


def _document_header(nproc: int, smoke: bool) -> str:
    """Returns the benchmark document's header: command, commit, library versions, GPUs."""
    import torch
    import transformers

    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    gpus = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "none"
    )
    return (
        "# automodel-parallel: 8B-shaped Llama on multiple GPUs\n\n"
        f"- command: `python benchmarks/parallel_bench.py --nproc {nproc}"
        f"{' --smoke' if smoke else ''}` (PYTHONPATH = packages/*/src + tests)\n"
        f"- commit: {commit or 'unknown'}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}\n"
        f"- GPUs: {gpus}\n\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (gloo)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per variant")
    args = parser.parse_args()
    if args.variant is None:
        _orchestrate(args.variants.split(","), args.nproc, args.smoke, args.timeout)
        return
    result = _run_variant(args.variant, args.smoke)
    if int(os.environ.get("RANK", "0")) == 0 and args.result is not None:
        args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
