"""Single-GPU training step of a Llama-3.2-1B-shaped model: automodel beside its peers (BENCHMARKS.md).

    # on a GPU machine, from the repository root (packages need not be installed); peers' wheels
    # unpacked into folders named by LIGER_SITE / NEMO_SITE (benchmarks/run_gpu_suite.sh does it):
    LIGER_SITE=/tmp/liger_site NEMO_SITE=/tmp/nemo_site python benchmarks/core_bench.py
    python benchmarks/core_bench.py --variants hf_eager,automodel   # a subset
    python benchmarks/core_bench.py --variant automodel             # one variant, in this process
    python benchmarks/core_bench.py --smoke                         # tiny shape on CPU (plumbing)

Variants, each in its own subprocess with a timeout (a crash, OOM or hang in one does not stop the
others), all in one invocation on the same card:

- ``hf_eager``: ``transformers.AutoModelForCausalLM.from_config``, SDPA attention: the baseline.
- ``hf_compile``: the same, ``torch.compile`` on every decoder layer.
- ``hf_liger``: the same with Liger-Kernel's Llama patches (``liger_kernel`` from ``$LIGER_SITE``).
- ``nemo``: NeMo AutoModel 0.7.0, ``NeMoAutoModelForCausalLM.from_config(config, dtype=bf16)``, in
  a process whose PYTHONPATH starts with ``$NEMO_SITE`` (its wheel + transformers 5.18 + torchao,
  unpacked with --no-deps) then ``$LIGER_SITE`` (its default fused kernels).
- ``automodel``: ``automodel.core.AutoModelForCausalLM.from_config``; the loss comes from the
  fused linear cross-entropy and the logits are not materialized (``logits_with_loss=False``).
- ``automodel_compile``: the same with ``compile=True`` (every decoder layer compiled).

Model: Llama-3.2-1B shape (vocab 128256, hidden 2048, FFN 8192, 16 layers, 32 heads x 64, 8 KV
heads, tied embeddings, rope llama3 theta 500000 factor 32), random init (seed 0), bf16 parameters,
AdamW(fused=True), ``model(input_ids=ids, labels=ids)``, seq 2048 x batch 4, 3 warm-up + 10 timed
steps, no host sync inside the timed loop. MFU (BENCHMARKS.md convention): FLOPs/token = 6 x matmul
params (lm_head in, input embedding out unless tied) + 12 x layers x hidden x seq = 8.22 GFLOP;
peak 989 TFLOP/s (H100 SXM / H200 dense bf16).

Variants run most-wanted first (the baseline, automodel, then the peers) within ``--budget``
seconds; the table lists them in a fixed order. Writes ``$OUT/core_<variant>.json`` / ``.log`` and
``$OUT/core_table.md`` (``$OUT`` or ./bench_out) and prints one markdown table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = [str(p) for p in sorted(REPO.glob("packages/*/src"))]
VARIANTS = ["hf_eager", "hf_compile", "hf_liger", "nemo", "automodel", "automodel_compile"]
RUN_ORDER = ["hf_eager", "automodel", "nemo", "hf_liger", "automodel_compile", "hf_compile"]
LABELS = {
    "hf_eager": "transformers eager (SDPA)",
    "hf_compile": "transformers + torch.compile (per layer)",
    "hf_liger": "transformers + Liger-Kernel",
    "nemo": "NeMo AutoModel 0.7.0",
    "automodel": "automodel",
    "automodel_compile": "automodel + compile (per layer)",
}
# variant -> (module it needs, environment variable naming a folder that holds it)
PEERS = {"hf_liger": ("liger_kernel", "LIGER_SITE"), "nemo": ("nemo_automodel", "NEMO_SITE")}
NEMO_NEEDS = (
    "nemo_automodel 0.7.0 imports needs transformers==5.18.0 and torchao beside it (BENCHMARKS.md); "
    "its METADATA also lists datasets, megatron-fsdp, mistral-common, ninja, pyyaml, tiktoken, "
    "torchdata, flashoptim, quack-kernels, which the training path used here does not import"
)
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


# ------------------------------------------------------------------------------ one variant
def _build(variant: str, config: Any, dtype: Any) -> Any:
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
        try:
            from nemo_automodel import NeMoAutoModelForCausalLM
        except Exception as err:  # ImportError, or a version clash raised while importing
            first = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            raise SystemExit(f"nemo_automodel did not import ({first}); {NEMO_NEEDS}") from None
        return NeMoAutoModelForCausalLM.from_config(config, dtype=dtype)
    from automodel.core import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, compile=variant == "automodel_compile"
    )
    assert type(model).__module__.startswith("automodel.core.models."), type(model)
    model.logits_with_loss = False  # a training loop needs only the loss
    return model


def run_variant(variant: str, smoke: bool) -> dict[str, Any]:
    """Returns the measured row of one variant: tokens/s, peak memory, losses, versions."""
    import torch
    import transformers

    shape = SMOKE_SHAPE if smoke else SHAPE
    seq, batch, steps, warmup = (32, 2, 2, 1) if smoke else (SEQ, BATCH, STEPS, WARMUP)
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = _build(variant, config, dtype).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = time.perf_counter()
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
    return {
        "variant": variant,
        "tokens_s": batch * seq * steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "setup_and_warmup_s": start - started,
        "seq": seq,
        "batch": batch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ------------------------------------------------------------------------------ the driver
def _child_env(variant: str) -> dict[str, str]:
    """Returns the environment of a variant's process: peers' folders, then the repository's code."""
    env = dict(os.environ)
    peers = {"nemo": ["NEMO_SITE", "LIGER_SITE"], "hf_liger": ["LIGER_SITE"]}.get(variant, [])
    # NEMO_SITE first: its transformers 5.18 must shadow the machine's for that process only.
    front = [os.environ[name] for name in peers if os.environ.get(name)]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in front]
    env["PYTHONPATH"] = os.pathsep.join(front + SOURCES + [str(REPO / "tests")] + rest)
    return env


def _missing_peer(variant: str, smoke: bool) -> str | None:
    """Returns why ``variant`` cannot run here, or None."""
    if variant not in PEERS:
        return None
    if smoke:
        return "a CUDA peer (the smoke run is on CPU)"
    module, env_name = PEERS[variant]
    site = os.environ.get(env_name)
    if (site and (Path(site) / module).is_dir()) or importlib.util.find_spec(module) is not None:
        return None
    return f"{module} not importable; unpack its wheel into a folder and set {env_name} to it"


def _run_child(variant: str, smoke: bool, timeout: float, out: Path) -> dict[str, Any] | str:
    """Returns the variant's result, or a one-line reason it has none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant]
    cmd += ["--smoke"] if smoke else []
    log = out / f"core_{variant}.log"
    result_file = out / f"core_{variant}.json"
    result_file.unlink(missing_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_child_env(variant),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its compile workers too
            proc.wait()
            return f"timed out after {timeout:.0f} s (log: {log.name})"
    if code != 0 or not result_file.exists():
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        return f"failed (exit {code}): {lines[-1][:300]}"
    return json.loads(result_file.read_text())  # type: ignore[no-any-return]


def _table(results: dict[str, dict[str, Any] | str], smoke: bool) -> str:
    import transformers

    from automodel.core import flops_per_token

    shape = SMOKE_SHAPE if smoke else SHAPE
    seq = 32 if smoke else SEQ
    flops = flops_per_token(transformers.LlamaConfig(**shape), seq)
    base = results.get("hf_eager")
    base_tps = base["tokens_s"] if isinstance(base, dict) else None
    rows = [
        "| variant | tokens/s | vs transformers eager | MFU | peak GiB | loss first -> last |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        if variant not in results:
            continue
        r = results[variant]
        if isinstance(r, str):
            rows.append(f"| {LABELS[variant]} | {r} | | | | |")
            continue
        ratio = f"{r['tokens_s'] / base_tps:.2f}x" if base_tps else "n/a"
        mfu = flops * r["tokens_s"] / (PEAK_TFLOPS * 1e12)
        rows.append(
            f"| {LABELS[variant]} | {r['tokens_s']:,.0f} | {ratio} | {100 * mfu:.1f}% "
            f"| {r['peak_gib']:.1f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    some = next((r for r in results.values() if isinstance(r, dict)), None)
    where = f"{some['device']}, torch {some['torch']}" if some else "no variant ran"
    title = (
        f"Llama-3.2-1B shape{' (SMOKE: tiny shape, CPU, fp32)' if smoke else ''}, seq {seq} x "
        f"batch {2 if smoke else BATCH}, AdamW, {1 if smoke else WARMUP} warm-up + "
        f"{2 if smoke else STEPS} timed steps; {where}; MFU = {flops / 1e9:.2f} GFLOP/token "
        f"(BENCHMARKS.md) x tokens/s / {PEAK_TFLOPS:.0f} TFLOP/s"
    )
    return title + "\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(RUN_ORDER), help="comma-separated subset")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per variant")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all variants")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        result = run_variant(args.variant, args.smoke)
        (out / f"core_{args.variant}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return

    sys.path[:0] = SOURCES  # the table needs automodel.core.flops_per_token
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; expected some of {VARIANTS}")
    deadline = time.monotonic() + args.budget
    results: dict[str, dict[str, Any] | str] = {}
    for variant in sorted(wanted, key=RUN_ORDER.index):
        missing = _missing_peer(variant, args.smoke)
        left = deadline - time.monotonic()
        if missing is not None:
            results[variant] = f"skipped: needs {missing}" if args.smoke else f"skipped: {missing}"
        elif left < 20:
            results[variant] = f"not run: the {args.budget:.0f} s budget was spent"
        else:
            timeout = min(args.timeout, left)
            print(f"[core_bench] {variant} (timeout {timeout:.0f} s)", flush=True)
            results[variant] = _run_child(variant, args.smoke, timeout, out)
            if isinstance(results[variant], str):
                print(f"[core_bench] {variant}: {results[variant]}", flush=True)
    table = _table(results, args.smoke)
    (out / "core_table.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
