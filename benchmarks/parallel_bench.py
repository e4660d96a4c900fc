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
untied), random init, bf16 parameters, FSDP mixed precision bf16 compute / fp32 reduce, AdamW,
SDPA attention, no activation checkpointing, seq 4096, 3 warm-up + 8 timed steps. Every variant
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
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["torch_fsdp2", "fsdp", "fsdp_tp2", "fsdp_pp2"]
SEQ, WARMUP, STEPS, PEAK_TFLOPS = 4096, 3, 8, 989.0
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
    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    with device:
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
        params = list(model.parameters())
        schedule = None
    else:
        sizes = {"fsdp": {}, "fsdp_tp2": {"tp": 2, "sequence_parallel": True}}.get(variant)
        common = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
        if variant == "fsdp_pp2":
            from automodel.parallel.pipeline import pipeline

            pconf = ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=2, **common)
            mesh = build_mesh(pconf)
            stages, schedule = pipeline(
                model, pconf, mesh, parallelize_fn=lambda m: parallelize(m, pconf, mesh)
            )
            params = [p for s in stages for p in s.parameters()]
            microbatches = 2
        else:
            assert sizes is not None, variant
            pconf = ParallelConfig(**sizes, **common)
            mesh = build_mesh(pconf)
            parallelize(model, pconf, mesh)
            params = list(model.parameters())
            schedule, microbatches = None, 1
        dp_size, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    # One sequence per GPU per step: a dp rank gets (GPUs per dp rank) sequences.
    per_dp = world // dp_size
    assert per_dp % microbatches == 0, (per_dp, microbatches)
    gen = torch.Generator(device="cpu").manual_seed(1234 + dp_rank)

    def step() -> float:
        ids = torch.randint(0, shape["vocab_size"], (per_dp, seq), generator=gen).to(device)
        if schedule is not None:
            loss = schedule.step(ids, ids)
            value = float(loss) if loss is not None else float("nan")
        else:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            value = float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    warmup, steps = (1, 1) if smoke else (WARMUP, STEPS)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync()
    elapsed = time.perf_counter() - start
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
        "last_loss": losses[-1],
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "torch": torch.__version__,
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


def _orchestrate(variants: list[str], nproc: int, smoke: bool) -> None:
    out = Path(os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        log = out / f"parallel_{variant}.log"
        result_file = out / f"parallel_{variant}.json"
        result_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-port=29533", __file__, "--variant", variant, "--result", str(result_file),
        ] + (["--smoke"] if smoke else [])  # fmt: skip
        start = time.time()
        with open(log, "w") as f:
            code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=1200)
        if code == 0 and result_file.exists():
            rows.append(json.loads(result_file.read_text()))
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            rows.append({"variant": variant, "error": f"exit {code}: " + " | ".join(tail)[-300:]})
        print(f"{variant}: done in {time.time() - start:.0f}s", flush=True)
    base = next((r for r in rows if r["variant"] == "torch_fsdp2" and "error" not in r), None)
    lines = [
        f"Llama-3.1-8B shape, seq {SEQ}, {nproc} GPUs, bf16 params, fp32 reduce, AdamW(fused); "
        f"MFU = 6 x matmul params + 12 x L x H x S per token over {PEAK_TFLOPS:.0f} TFLOP/s",
        "",
        "| variant | tokens/s/GPU | vs torch FSDP2 | MFU | peak GiB | step s | GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.3f}" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {r['mfu']:.1%} | "
            f"{r['peak_gib']:.1f} | {r['step_s']:.2f} | {r['gpu']} |"
        )
    table = "\n".join(lines)
    (out / "parallel_bench.md").write_text(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (gloo)")
    args = parser.parse_args()
    if args.variant is None:
        _orchestrate(args.variants.split(","), args.nproc, args.smoke)
        return
    result = _run_variant(args.variant, args.smoke)
    if int(os.environ.get("RANK", "0")) == 0 and args.result is not None:
        args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
