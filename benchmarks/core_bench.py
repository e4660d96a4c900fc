"""Single-GPU training step of a Llama-3.2-1B-shaped model: automodel vs its peers (BENCHMARKS.md).

    # on a GPU machine, from the repository root (packages need not be installed):
    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/core_bench.py
    # one variant by hand:
    python benchmarks/core_bench.py --variant automodel

Variants, each in its own subprocess (a crash or OOM in one does not stop the others):

- ``hf_eager``: ``transformers.AutoModelForCausalLM.from_config`` with SDPA attention.
- ``hf_compile``: the same, ``torch.compile`` on every decoder layer.
- ``hf_liger``: the same with Liger-Kernel's Llama patches (skipped when not importable).
- ``nemo``: NeMo AutoModel 0.7.0's ``NeMoAutoModelForCausalLM.from_config`` (skipped when absent).
- ``automodel``: ``automodel.core.AutoModelForCausalLM.from_config``; the loss comes from the
  fused linear cross-entropy and the logits are not materialized (``logits_with_loss=False``).
- ``automodel_compile``: the same with ``compile=True`` (every decoder layer compiled).

Model: Llama-3.2-1B shape (vocab 128256, hidden 2048, FFN 8192, 16 layers, 32 heads x 64, 8 KV
heads, tied embeddings, rope llama3 theta 500000 factor 32), random init, bf16 parameters,
AdamW(fused=True), ``model(input_ids, labels=input_ids)``, seq 2048 x batch 4, 3 warm-up + 10 timed
steps. MFU (BENCHMARKS.md convention): FLOPs/token = 6 x matmul params (lm_head in, input embedding
out unless tied) + 12 x layers x hidden x seq = 8.22 GFLOP; peak 989 TFLOP/s (H100 SXM / H200).

``--smoke`` runs every variant on CPU with a tiny shape to check the script itself.
Writes ``$OUT/core_<variant>.json`` and ``.log`` (or ./bench_out) and prints one markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ["hf_eager", "hf_compile", "hf_liger", "nemo", "automodel", "automodel_compile"]
SEQ, BATCH, WARMUP, STEPS, PEAK_TFLOPS = 2048, 4, 3, 10, 989.0
SHAPE: dict[str, Any] = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    use_cache=False,
)
SMOKE_SHAPE = {
    **SHAPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def _build(variant: str, config: Any, dtype: Any) -> Any:
    import torch
    import transformers

    if variant.startswith("hf"):
        if variant == "hf_liger":
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
        if variant == "hf_compile":
            for layer in model.model.layers:
                layer.compile()
        return model
    if variant == "nemo":
        from nemo_automodel import NeMoAutoModelForCausalLM

        return NeMoAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    from automodel.core import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, compile=variant == "automodel_compile"
    )
    assert type(model).__module__.startswith("automodel.core.models."), type(model)
    model.logits_with_loss = False  # a training loop needs only the loss
    return model


def run_variant(variant: str, smoke: bool) -> dict[str, Any]:
    """Returns the measured row of one variant (run in its own process)."""
    import torch
    import transformers

    from automodel.core import flops_per_token

    shape = SMOKE_SHAPE if smoke else SHAPE
    seq, batch, steps = (32, 2, 2) if smoke else (SEQ, BATCH, STEPS)
    warmup = 1 if smoke else WARMUP
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    model = _build(variant, config, dtype).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=not smoke)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - start
    tokens_s = batch * seq * steps / elapsed
    flops = flops_per_token(config, seq)
    return {
        "variant": variant,
        "tokens_s": tokens_s,
        "mfu": flops * tokens_s / (PEAK_TFLOPS * 1e12),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "gflop_per_token": flops / 1e9,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _available(variant: str) -> str | None:
    import importlib.util

    needs = {"hf_liger": "liger_kernel", "nemo": "nemo_automodel"}.get(variant)
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} not importable"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        result = run_variant(args.variant, args.smoke)
        (out / f"core_{args.variant}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return
    rows = []
    for variant in VARIANTS:
        why = _available(variant)
        if why is not None:
            rows.append(f"| {variant} | skipped: {why} | | | |")
            continue
        cmd = [sys.executable, __file__, "--variant", variant] + (["--smoke"] if args.smoke else [])
        log = out / f"core_{variant}.log"
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=1200)
        result_file = out / f"core_{variant}.json"
        if proc.returncode != 0 or not result_file.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            rows.append(f"| {variant} | failed (exit {proc.returncode}): {tail[0][:120]} | | | |")
            continue
        r = json.loads(result_file.read_text())
        rows.append(
            f"| {variant} | {r['tokens_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} "
            f"| {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )

    print(
        f"\nLlama-3.2-1B shape, seq {SEQ} x batch {BATCH}, bf16, AdamW fused, {WARMUP}+{STEPS} "
        f"steps; MFU = 8.22 GFLOP/token (BENCHMARKS.md) x tokens/s / 989 TFLOP/s"
    )
    print("\n| variant | tokens/s | MFU | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
