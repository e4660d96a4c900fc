"""Attention backends and the MoE layer: forward+backward time and peak memory, side by side.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/kernels_attention_moe_bench.py
    python benchmarks/kernels_attention_moe_bench.py --only attn_1b_causal_sdpa   # one variant
    python benchmarks/kernels_attention_moe_bench.py --smoke   # CPU, tiny shapes: checks the script runs

Every variant runs in its own subprocess (an OOM or a crash in one cannot take down the others),
writes one JSON line to ``$OUT/kernels_attention_moe.jsonl`` (or ./bench_out/) and the parent prints
one markdown table last. Shapes: Llama-3.2-1B attention (batch 4 x 2048, 32 heads x 64, 8 KV heads),
Llama-3.1-8B attention (1 x 8192, 32 x 128, 8 KV heads), and a Qwen3-30B-A3B MoE layer (8192 tokens,
hidden 2048, 128 experts, top-8, expert FFN 768), bf16. "rel err" is ||out - ref|| / ||ref|| of the
forward output against the fp32 eager reference (attention) or the fp32 loop (MoE) at the same shape.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WARMUP, ITERS = 3, 10
SMOKE = os.environ.get("KERNELS_BENCH_SMOKE") == "1"  # set by --smoke for the child processes
DEVICE = "cpu" if SMOKE else "cuda"

# name -> (group, description)
ATTENTION_VARIANTS = {
    f"attn_{shape}_{pattern}_{impl}": (shape, pattern, impl)
    for shape, pattern, impl in [
        ("1b", "causal", "sdpa"),
        ("1b", "causal", "flex"),
        ("1b", "causal", "flash_attn"),
        ("1b", "causal", "hf_sdpa"),
        ("1b", "causal", "eager"),
        ("1b", "docs", "flex"),
        ("1b", "docs", "sdpa"),
        ("1b", "docs", "flash_attn"),
        ("1b", "docs", "hf_sdpa"),
        ("1b", "window", "flex"),
        ("1b", "window", "sdpa"),
        ("8b", "causal", "sdpa"),
        ("8b", "causal", "flex"),
        ("8b", "docs", "flex"),
        ("8b", "docs", "flash_attn"),
    ]
}
MOE_VARIANTS = {
    "moe_automodel_grouped_mm": "grouped_mm",
    "moe_automodel_loop": "torch",
    "moe_hf_qwen3": "hf",
}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Returns (milliseconds per call, peak GiB above what was allocated before)."""
    import torch

    for _ in range(WARMUP):
        fn()
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERS, (torch.cuda.max_memory_allocated() - base) / 2**30


def _documents(batch: int, seq: int, device: str) -> Any:
    """Four documents per row with fixed, uneven lengths (so runs are comparable)."""
    import torch

    cuts = [0, seq // 8, seq // 2, seq - seq // 5, seq]
    ids = torch.zeros(seq, dtype=torch.long, device=device)
    for d in range(4):
        ids[cuts[d] : cuts[d + 1]] = d
    return ids.expand(batch, seq).contiguous()


def run_attention(name: str) -> dict[str, Any]:
    import torch

    from automodel.kernels import attention

    shape, pattern, impl = ATTENTION_VARIANTS[name]
    batch, seq, heads, kv_heads, dim = (
        (4, 2048, 32, 8, 64) if shape == "1b" else (1, 8192, 32, 8, 128)
    )
    if SMOKE:
        batch, seq, heads, kv_heads = 1, 256, 4, 2
        if impl == "flex":
            raise RuntimeError("skipped in --smoke: FlexAttention has no CPU backward")
    torch.manual_seed(0)
    dev = DEVICE
    q = torch.randn(batch, heads, seq, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(q)
    kwargs: dict[str, Any] = {}
    if pattern == "docs":
        kwargs["document_ids"] = _documents(batch, seq, dev)
    elif pattern == "window":
        kwargs["window"] = seq // 4

    if impl == "hf_sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from automodel.kernels.attention.masks import MaskSpec

        module = torch.nn.Module()
        module.num_key_value_groups = heads // kv_heads  # type: ignore[assignment]
        module.is_causal = True  # type: ignore[assignment]
        mask = None
        if pattern != "causal":
            mask = MaskSpec(q_len=seq, kv_len=seq, **kwargs).dense(q.device)

        def forward() -> Any:
            return sdpa_attention_forward(module, q, k, v, mask)[0].transpose(1, 2)
    else:
        if impl == "flash_attn":
            import flash_attn  # noqa: F401  (fail early, reported as "not installed")

        def forward() -> Any:
            return attention(q, k, v, backend=impl, **kwargs)

    def step() -> None:
        out = forward()
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    ms, peak = _timed(step)
    with torch.no_grad():
        out = forward().double()
        ref = attention(q.float(), k.float(), v.float(), backend="eager", **kwargs).double()
        rel = float((out - ref).norm() / ref.norm())
    # Causal attention FLOPs, forward 4*B*H*S^2*D/2, backward 2.5x forward.
    flops = 3.5 * 4 * batch * heads * seq * seq * dim / 2 if pattern == "causal" else None
    return {
        "variant": name,
        "ms": ms,
        "peak_gib": peak,
        "rel_err": rel,
        "tflops": flops / ms / 1e9 if flops else None,
    }


def run_moe(name: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from automodel.kernels import grouped_mm, permute, topk_route, unpermute

    tokens, hidden, experts, top_k, ffn = 8192, 2048, 128, 8, 768
    if SMOKE:
        tokens, hidden, experts, ffn = 256, 128, 16, 64
    torch.manual_seed(0)
    dev, dt = DEVICE, torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
    router = (torch.randn(experts, hidden, device=dev, dtype=dt) * 0.02).requires_grad_()
    gate_up = (torch.randn(experts, 2 * ffn, hidden, device=dev, dtype=dt) * 0.02).requires_grad_()
    down = (torch.randn(experts, hidden, ffn, device=dev, dtype=dt) * 0.02).requires_grad_()
    grad = torch.randn_like(x)
    kind = MOE_VARIANTS[name]

    def ours(
        backend: str,
        x: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        route_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = F.linear(x, router.to(x.dtype)) if route_logits is None else route_logits
        weights, indices, _ = topk_route(logits, top_k)
        permuted, row_map, counts = permute(x, indices, experts)
        g, u = grouped_mm(permuted, gate_up.transpose(1, 2), counts, backend=backend).chunk(
            2, dim=-1
        )
        y = grouped_mm(F.silu(g) * u, down.transpose(1, 2), counts, backend=backend)
        return unpermute(y, row_map, weights)

    if kind == "hf":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = Qwen3MoeConfig(
            hidden_size=hidden,
            moe_intermediate_size=ffn,
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
        )
        block = Qwen3MoeSparseMoeBlock(config).to(dev, dt)
        with torch.no_grad():
            block.gate.weight.copy_(router)
            block.experts.gate_up_proj.copy_(gate_up)
            block.experts.down_proj.copy_(down)

        def forward() -> torch.Tensor:
            return block(x.unsqueeze(0)).squeeze(0)
    else:

        def forward() -> torch.Tensor:
            return ours(kind, x, gate_up, down)

    def step() -> None:
        forward().backward(grad)
        x.grad = None

    ms, peak = _timed(step)
    with torch.no_grad():
        out = forward().double()
        # The reference routes on the bf16 run's logits: a near-tie flipping an expert choice
        # between bf16 and fp32 would otherwise dominate the error.
        bf16_logits = F.linear(x, router).float()
        ref = ours("torch", x.float(), gate_up.float(), down.float(), bf16_logits).double()
        rel = float((out - ref).norm() / ref.norm())
    # Expert FLOPs: 3 matmuls of [tokens*k, hidden] x [hidden, ffn] (gate, up, down), fwd + 2x bwd.
    flops = 3 * 2 * tokens * top_k * hidden * ffn * 3
    return {"variant": name, "ms": ms, "peak_gib": peak, "rel_err": rel, "tflops": flops / ms / 1e9}


def _child(name: str, out_dir: Path) -> None:
    try:
        result = run_moe(name) if name in MOE_VARIANTS else run_attention(name)
    except ImportError as err:
        result = {"variant": name, "error": f"not installed: {err.name or err}"}
    except Exception as err:  # reported in the table; the traceback is in the variant's log
        import traceback

        traceback.print_exc()
        result = {"variant": name, "error": f"{type(err).__name__}: {str(err)[:120]}"}
    with open(out_dir / "kernels_attention_moe.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes: only checks the script"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        os.environ["KERNELS_BENCH_SMOKE"] = "1"
    out_dir = Path(os.environ.get("OUT") or "bench_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.child:
        _child(args.child, out_dir)
        return
    results_file = out_dir / "kernels_attention_moe.jsonl"
    results_file.unlink(missing_ok=True)
    names = args.only or [*ATTENTION_VARIANTS, *MOE_VARIANTS]
    for name in names:
        t0 = time.time()
        with open(out_dir / f"{name}.log", "w") as log:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=900,
            )
        print(f"{name}: exit {proc.returncode} in {time.time() - t0:.0f}s", flush=True)
    rows = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            rows[r["variant"]] = r
    import torch

    print(
        f"\n{'CPU smoke run' if args.smoke else torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print("\n| variant | fwd+bwd ms | TFLOP/s | peak GiB | rel err | note |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = rows.get(name, {"error": "crashed (see its log)"})
        print(
            f"| {name} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('tflops'), '.0f')} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} | {_fmt(r.get('rel_err'), '.1e')} | {r.get('error', '')} |"
        )


if __name__ == "__main__":
    main()
