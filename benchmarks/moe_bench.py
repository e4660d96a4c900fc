"""Single-GPU training step of a Qwen3-30B-A3B-shaped MoE (fewer layers): automodel vs its peers.

    # on a GPU machine, from the repository root (packages need not be installed):
    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/moe_bench.py
    # one variant by hand, or another size:
    python benchmarks/moe_bench.py --variant automodel --layers 4 --seq 2048
    # check the script itself (tiny shape, CPU, 2 steps):
    uv run python benchmarks/moe_bench.py --smoke

Variants, each in its own subprocess (a crash or OOM in one does not stop the others):

- ``hf_eager_loop``: ``transformers.AutoModelForCausalLM.from_config(...,
  experts_implementation="eager")``: transformers' Python loop over the experts hit. On a
  transformers without ``experts_implementation`` the plain default forward (that same loop).
- ``hf_grouped_mm``: the same with ``experts_implementation="grouped_mm"`` (transformers' own
  ``torch._grouped_mm`` path; skipped where transformers lacks the option). Which one transformers
  picks by default is recorded as ``transformers_default_experts`` (5.24: ``grouped_mm``).
- ``automodel``: ``automodel.core.AutoModelForCausalLM.from_config(config, dtype=bf16)``. Qwen3-MoE
  has no optimized class yet, so this is the kernel-patched transformers fallback; when the
  returned model's experts are not already grouped, this script calls
  ``automodel.core.moe.patch_moe_experts`` itself (the row's ``note`` says which happened).
- ``nemo``: NeMo AutoModel 0.7.0, ``NeMoAutoModelForCausalLM.from_config(config, dtype=bf16)``
  then ``.cuda()``; its forward returns logits only, so the loss is the same shifted
  cross-entropy computed here in fp32. Skipped, with the import error as the note, when absent.

Optional peers live in their own folders: ``$NEMO_SITE`` (and ``$LIGER_SITE``, NeMo's optional
Liger dependency) are prepended to ``PYTHONPATH`` only in the ``nemo`` subprocess.

Model: Qwen3-30B-A3B shape (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 heads x 128
head_dim, 4 KV heads, vocab 151936, untied) with ``--layers`` (default 8) decoder layers, random
init (seed 0, on the CPU, then moved to the GPU), bf16 parameters, AdamW(fused=True), seq 4096 x
batch 1, 3 warm-up + 8 timed steps.
MFU: see :func:`active_flops_per_token` (BENCHMARKS.md convention, active experts only);
peak 989 TFLOP/s (H100 SXM / H200 dense bf16).

Writes ``$OUT/moe_bench.json`` when ``OUT`` is set (variant logs under ``$OUT/moe_logs/``) and
prints one markdown table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# the slowest (the eager loop) last, so a tight overall time limit loses the least
VARIANTS = ["automodel", "hf_grouped_mm", "nemo", "hf_eager_loop"]
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
    width the QK^T and PV products actually run at; for Llama shapes it equals the hidden size of
    the BENCHMARKS.md wording. No causal discount, no recompute. This matches
    ``automodel.core.flops_per_token``, which the smoke run checks.

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


def _experts_impl(model: Any) -> str | None:
    return getattr(model.config, "_experts_implementation", None)


def _build(variant: str, config: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """Returns (model on the CPU, extra fields for the result row).

    Every variant is initialized on the CPU from the same seed (transformers' and automodel's
    variants then hold identical weights, so their first-step losses must agree) and moved to
    the GPU by the caller. Building under ``with torch.device("cuda")`` would be faster but
    automodel's fallback probes its kernels with CPU generators, which that context breaks.
    """
    import torch
    import transformers

    info: dict[str, Any] = {}
    if variant.startswith("hf"):
        impl = "eager" if variant == "hf_eager_loop" else "grouped_mm"
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa", experts_implementation=impl
            )
        except TypeError as exc:  # a transformers without experts_implementation
            if variant == "hf_grouped_mm":
                raise _Skip(f"transformers {transformers.__version__}: {exc}") from exc
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa"
            )
            info["note"] = "no experts_implementation option: default forward"
        info["experts_implementation"] = _experts_impl(model)
        default = getattr(model, "get_correct_experts_implementation", None)
        if default is not None:
            info["transformers_default_experts"] = default(None)
        return model, info
    if variant == "nemo":
        try:
            from nemo_automodel import NeMoAutoModelForCausalLM
        except Exception as exc:  # any import failure: not available here
            raise _Skip(f"{type(exc).__name__}: {exc}") from exc
        try:
            model = NeMoAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except Exception as exc:
            text = str(exc).lower()
            if not any(w in text for w in ("process group", "distributed", "init_process_group")):
                raise
            _init_single_rank()  # its MoE wants a process group: give it a 1-rank one
            model = NeMoAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            info["note"] = "1-rank process group initialized"
        return model, info
    from automodel.core import AutoModelForCausalLM
    from automodel.core.moe import is_experts_module, patch_moe_experts

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    experts = [m for m in model.modules() if is_experts_module(m)]
    if experts and all(getattr(m, "_automodel_grouped", False) for m in experts):
        info["note"] = "experts grouped by from_config"
    else:
        patch_moe_experts(model)
        info["note"] = "patch_moe_experts called by the bench (from_config does not yet)"
    info["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    return model, info


class _Skip(Exception):
    """The variant cannot run here (missing package or option); its message is the note."""


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


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Returns the measured row of one variant (run in its own process)."""
    import torch
    import transformers

    shape = {**(SMOKE_SHAPE if args.smoke else SHAPE), "num_hidden_layers": args.layers}
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = transformers.Qwen3MoeConfig(**shape)
    row: dict[str, Any] = {"variant": variant, "transformers": transformers.__version__}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = _build(variant, config, dtype)
    row.update(info)
    model = model.to(device).train()
    row["build_s"] = time.perf_counter() - t0
    row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            start = time.perf_counter()
        loss = _loss(model, ids, variant)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - start
    tokens_s = args.batch * args.seq * args.steps / elapsed
    flops = active_flops_per_token(config, args.seq)
    row.update(
        tokens_s=tokens_s,
        mfu=flops * tokens_s / (PEAK_TFLOPS * 1e12),
        gflop_per_token=flops / 1e9,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
        first_loss=float(losses[0]),
        last_loss=float(losses[-1]),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    if args.smoke:  # the bench's own FLOP count agrees with the library's
        from automodel.core import flops_per_token

        assert abs(flops_per_token(config, args.seq) - flops) < 1e-6 * flops, "FLOP count differs"
    return row


def _child(args: argparse.Namespace) -> None:
    result = Path(args.result)
    try:
        row = run_variant(args.variant, args)
    except _Skip as exc:
        row = {"variant": args.variant, "skipped": str(exc)}
    except Exception as exc:  # reported in the table, traceback in the log
        traceback.print_exc()
        kind = "OOM" if "out of memory" in str(exc).lower() else type(exc).__name__
        row = {"variant": args.variant, "error": f"{kind}: {str(exc).splitlines()[0][:160]}"}
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


def _cell(row: dict[str, Any]) -> str:
    name = row["variant"]
    if "skipped" in row:
        return f"| {name} | skipped: {row['skipped'][:160]} | | | | |"
    if "error" in row:
        return f"| {name} | failed: {row['error']} | | | | |"
    note = "; ".join(
        str(row[k]) for k in ("experts_implementation", "note", "transformers") if row.get(k)
    )
    return (
        f"| {name} | {row['tokens_s']:,.0f} | {100 * row['mfu']:.1f}% | {row['peak_gib']:.1f} "
        f"| {row['first_loss']:.4f} -> {row['last_loss']:.4f} | {note} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run only this one, in-process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 2 steps")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (2, 32, 1, 1, 2) if args.smoke else (8, 4096, 1, 3, 8)
    for name, value in zip(("layers", "seq", "batch", "warmup", "steps"), defaults, strict=True):
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
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("layers", "seq", "batch", "warmup", "steps")
    ]
    rows: list[dict[str, Any]] = []
    for variant in [v for v in args.variants.split(",") if v]:
        result = logs / f"{variant}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--variant", variant, f"--result={result}", *passthrough]
        cmd += ["--smoke"] if args.smoke else []
        log = logs / f"{variant}.log"
        print(f"[moe_bench] {variant} ...", flush=True)
        with open(log, "w") as fh:
            code: int | str
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=args.timeout,
                    env=_child_env(variant),
                )
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if result.exists():
            row = json.loads(result.read_text())
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            row = {"variant": variant, "error": f"exit {code}: {tail[0][:160]}"}
        rows.append(row)
        print(f"[moe_bench] {variant}: {json.dumps(row)}", flush=True)

    ran = [r for r in rows if "tokens_s" in r]
    first = [r["first_loss"] for r in ran]
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
    defaults_seen = {
        str(r["transformers_default_experts"]) for r in ran if r.get("transformers_default_experts")
    }
    print(
        f"\nQwen3-30B-A3B shape, {args.layers} layers, seq {args.seq} x batch {args.batch}, "
        f"{'fp32 CPU smoke' if args.smoke else 'bf16'}, AdamW, {args.warmup}+{args.steps} steps. "
        f"MFU = {gflop:.2f} GFLOP/token (6 x ACTIVE matmul params + 12 x layers x heads x head_dim"
        f" x seq, BENCHMARKS.md) x tokens/s / {PEAK_TFLOPS:.0f} TFLOP/s. transformers' default "
        f"experts implementation: {', '.join(sorted(defaults_seen)) or 'n/a'}. "
        f"First-step loss spread across variants: {spread:.4f} (same seed/config: should be ~0)."
    )
    print("\n| variant | tokens/s | MFU | peak GiB | loss first -> last | notes |")
    print("|---|---|---|---|---|---|")
    print("\n".join(_cell(r) for r in rows))


if __name__ == "__main__":
    main()
