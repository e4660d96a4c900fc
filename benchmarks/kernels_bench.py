"""Benchmark automodel.kernels' dense ops against torch eager, torch.compile and Liger-Kernel.

Run from the repository root on a GPU machine (packages need not be installed)::

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/kernels_bench.py
    python benchmarks/kernels_bench.py --ops rms_norm,linear_cross_entropy --shapes 8b --impls eager,automodel
    python benchmarks/kernels_bench.py --variants rms_norm:8b:automodel,rms_norm:8b:automodel@num_stages=2

Every (op, shape, implementation) runs in its own subprocess, so a crash or an out-of-memory error in
one never takes down the others; each writes a JSON result (and the log) to ``$OUT`` when set. The
markdown table comes last on stdout.

What is measured: forward + backward of the op on bf16 CUDA tensors at Llama-3.2-1B (8192 tokens =
4 x 2048) and Llama-3.1-8B (8192 tokens = 1 x 8192) shapes, three ways: "launched" (the median of 5
batches of 10 back-to-back Python steps, CUDA events: host-bound for the small ops), "graph" (10
steps captured in one CUDA graph and replayed: the kernels plus the gaps between them, no Python or
launch overhead) and "kernels" (the sum of every kernel's own duration per step from torch.profiler,
with the top kernels in the JSON result); the peak memory one step allocates above its inputs
(``max_memory_allocated`` after ``reset_peak_memory_stats``). For the memory-bound ops "MB moved"
counts the HBM traffic of forward + backward (each tensor read or written once per pass, bf16, plus
the fp32 weight-gradient partials the norms write and read back), and "% roofline" divides the
achieved bandwidth (graph and kernel times) by the card's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s);
the ``copy`` row (a plain clone) shows the practical ceiling. ``--sweep``/``--variants`` add launch
geometries of the Triton kernels (``rms_norm:automodel@programs_per_sm=1+rows_per_step=2``).

Implementations: ``eager`` is the PyTorch reference (the same math as transformers' modules; for the
losses, ``F.cross_entropy`` on fp32-upcast logits, as transformers' loss does); ``compile`` is
``torch.compile`` of that; ``liger`` is Liger-Kernel's counterpart (skipped with a note when
``liger_kernel`` is not importable); ``automodel`` is ``backend="triton"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SHAPES: dict[str, dict[str, int]] = {
    "1b": {"batch": 4, "seq": 2048, "hidden": 2048, "ffn": 8192, "heads": 32, "kv_heads": 8,
           "head_dim": 64, "vocab": 128256},
    "8b": {"batch": 1, "seq": 8192, "hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8,
           "head_dim": 128, "vocab": 128256},
}  # fmt: skip
OPS = (
    "copy",
    "rms_norm",
    "add_rms_norm",
    "rope",
    "swiglu",
    "cross_entropy",
    "linear_cross_entropy",
)
IMPLS = ("eager", "compile", "liger", "automodel")
# Extra automodel variants of linear_cross_entropy: tokens per chunk.
LCE_CHUNKS = (256, 384)
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
BF16 = 2


def _variants(
    ops: list[str], shapes: list[str], impls: list[str], sweep: list[str] = ()
) -> list[tuple[str, str, str]]:
    """Returns every (op, shape, impl) to run; ``sweep`` adds ``op:impl`` entries at each shape."""
    out = []
    for shape in shapes:
        for op in ops:
            for impl in impls:
                if op != "copy" or impl == "eager":  # copy: the bandwidth a plain clone reaches
                    out.append((op, shape, impl))
            if op == "linear_cross_entropy" and "automodel" in impls:
                out += [(op, shape, f"automodel_chunk{c}") for c in LCE_CHUNKS]
            out += [
                (op, shape, entry.split(":", 1)[1]) for entry in sweep if entry.startswith(f"{op}:")
            ]
    return out


def _apply_tuning(op: str, impl: str) -> None:
    """Sets the launch geometry an ``automodel@key=value+key=value`` variant names."""
    if "@" not in impl:
        return
    if op in ("rms_norm", "add_rms_norm"):
        from automodel.kernels._triton.norm import BWD_TUNING as tuning
    elif op == "rope":
        from automodel.kernels._triton.rope import TUNING as tuning
    elif op == "swiglu":
        from automodel.kernels._triton.activations import TUNING as tuning
    else:
        raise ValueError(f"variant {impl!r}: op {op!r} has no launch tuning to sweep")
    for item in impl.split("@", 1)[1].split("+"):
        key, value = item.split("=")
        if key not in tuning:
            raise ValueError(
                f"variant {impl!r}: unknown key {key!r}; expected one of {list(tuning)}"
            )
        tuning[key] = int(value)


# ----------------------------------------------------------------------------- child process


def _build(op: str, s: dict[str, int], impl: str) -> tuple[Callable[[], Any], list[Any], int]:
    """Returns (step, tensors needing grad, bytes moved) for one variant; step runs fwd + bwd."""
    import torch
    import torch.nn.functional as F

    from automodel import kernels as K

    dev, dt = "cuda", torch.bfloat16
    tokens = s["batch"] * s["seq"]
    compile_ = torch.compile if impl == "compile" else (lambda f: f)
    backend = "triton" if impl.startswith("automodel") else "torch"

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_(True)

    if op == "copy":
        # The practical ceiling of a memory-bound op: clone the 8192 x FFN gate activations.
        src = torch.randn(tokens, s["ffn"], device=dev).to(dt)
        return (lambda: src.clone()), [], 2 * src.numel() * BF16
    if op in ("rms_norm", "add_rms_norm"):
        x, weight = leaf(tokens, s["hidden"]), leaf(s["hidden"])
        residual = leaf(tokens, s["hidden"])
        if op == "rms_norm":
            params, n_bytes = [x, weight], 5 * tokens * s["hidden"] * BF16
            if impl == "liger":
                from liger_kernel.transformers import LigerRMSNorm

                module = LigerRMSNorm(s["hidden"], eps=1e-6).to(dev, dt)
                weight = module.weight
                params[1] = weight

                def forward() -> Any:
                    return module(x)
            else:
                fn = compile_(lambda a, w: K.rms_norm(a, w, 1e-6, backend=backend))

                def forward() -> Any:
                    return fn(x, weight)
        else:
            params, n_bytes = [x, residual, weight], 8 * tokens * s["hidden"] * BF16
            if impl == "liger":
                from liger_kernel.transformers import LigerFusedAddRMSNorm

                module = LigerFusedAddRMSNorm(s["hidden"], eps=1e-6).to(dev, dt)
                weight = module.weight
                params[2] = weight

                def forward() -> Any:
                    return module(x, residual)
            else:
                fn = compile_(lambda a, r, w: K.add_rms_norm(a, r, w, 1e-6, backend=backend))

                def forward() -> Any:
                    return fn(x, residual, weight)

        n_bytes += _dw_partial_bytes(impl, tokens, s["hidden"])
    elif op == "rope":
        b, n, hq, hk, d = s["batch"], s["seq"], s["heads"], s["kv_heads"], s["head_dim"]
        # HF layout: projections are [B, S, H, D] in memory, viewed as [B, H, S, D].
        q = leaf(b, n, hq, d)
        k = leaf(b, n, hk, d)
        inv_freq, scale = K.rope_init({"rope_type": "default", "rope_theta": 5e5}, d, device=dev)
        cos, sin = K.rope_cos_sin(
            inv_freq, torch.arange(n, device=dev)[None].expand(b, -1), attention_scaling=scale,
            dtype=dt,
        )  # fmt: skip
        params = [q, k]
        n_bytes = 4 * b * n * (hq + hk) * d * BF16 + 4 * b * n * d * BF16
        if impl == "liger":
            from liger_kernel.transformers import liger_rotary_pos_emb

            def forward() -> Any:
                return liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        else:
            fn = compile_(lambda a, c: K.apply_rotary(a, c, cos, sin, backend=backend))

            def forward() -> Any:
                return fn(q.transpose(1, 2), k.transpose(1, 2))
    elif op == "swiglu":
        gate, up = leaf(tokens, s["ffn"]), leaf(tokens, s["ffn"])
        params, n_bytes = [gate, up], 8 * tokens * s["ffn"] * BF16
        if impl == "liger":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            def forward() -> Any:
                return LigerSiLUMulFunction.apply(gate, up)
        else:
            fn = compile_(lambda g, u: K.swiglu(g, u, backend=backend))

            def forward() -> Any:
                return fn(gate, up)
    elif op == "cross_entropy":
        logits = leaf(tokens, s["vocab"], scale=3.0)
        labels = torch.randint(0, s["vocab"], (tokens,), device=dev)
        params, n_bytes = [logits], 3 * tokens * s["vocab"] * BF16
        if impl == "liger":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            loss_fn = LigerCrossEntropyLoss()

            def forward() -> Any:
                return _first(loss_fn(logits, labels))
        elif impl == "automodel":

            def forward() -> Any:
                return K.cross_entropy(logits, labels, backend="triton")[0]
        else:
            fn = compile_(lambda z, y: F.cross_entropy(z.float(), y))

            def forward() -> Any:
                return fn(logits, labels)
    elif op == "linear_cross_entropy":
        hidden = leaf(tokens, s["hidden"])
        weight = leaf(s["vocab"], s["hidden"], scale=s["hidden"] ** -0.5)
        labels = torch.randint(0, s["vocab"], (tokens,), device=dev)
        params, n_bytes = [hidden, weight], 0
        if impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_fn = LigerFusedLinearCrossEntropyLoss()

            def forward() -> Any:
                return _first(loss_fn(weight, hidden, labels))
        elif impl.startswith("automodel"):
            chunk = int(impl.removeprefix("automodel_chunk")) if "chunk" in impl else None

            def forward() -> Any:
                return K.linear_cross_entropy(
                    hidden, weight, labels, chunk_size=chunk, backend="triton"
                )[0]
        else:
            fn = compile_(lambda h, w, y: F.cross_entropy((h @ w.T).float(), y))

            def forward() -> Any:
                return fn(hidden, weight, labels)
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")

    def outputs() -> list[torch.Tensor]:
        outs = forward()
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    # Upstream gradients made once, so the timed steps hold nothing but the op.
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outputs()]

    def step() -> None:
        torch.autograd.grad(outputs(), params, grads)

    return step, params, n_bytes


def _dw_partial_bytes(impl: str, tokens: int, hidden: int) -> int:
    """Returns the HBM bytes of a norm's fp32 weight-gradient partials (written, then summed)."""
    import torch

    if impl == "liger":
        rows = torch.cuda.get_device_properties(0).multi_processor_count  # one row per SM
    elif impl.startswith("automodel"):
        from automodel.kernels._triton.launch import persistent_programs
        from automodel.kernels._triton.norm import BWD_TUNING

        rows = persistent_programs(torch.device("cuda", 0), tokens, BWD_TUNING["programs_per_sm"])
    else:
        return 0  # eager/compile reduce the weight gradient without a partials buffer
    return 2 * rows * hidden * 4


def _first(out: Any) -> Any:
    """Liger's losses return a tensor, a tuple or an output object, depending on the version."""
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "loss", out)


def _graph_ms(step: Callable[[], None], iters: int = 10) -> float | None:
    """Returns the ms per step of ``iters`` steps captured in one CUDA graph (None if uncapturable).

    Replaying a graph launches every kernel of a step without Python, autograd or launch overhead:
    what is left is the kernels' own time plus the short gaps between them on the GPU.
    """
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                step()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as error:  # e.g. a host sync inside a peer's op
        print(f"graph capture failed: {error!r}", flush=True)
        return None
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _kernel_ms(step: Callable[[], None], iters: int = 5) -> tuple[float, list[list[Any]]]:
    """Returns (ms of GPU work per step, [[kernel, us per step], ...]) from torch.profiler.

    The sum of the durations of every kernel, memset and copy the GPU ran for a step, as CUPTI
    reports them: the time the kernels themselves take, with no gap or launch overhead between.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.time_range.elapsed_us()
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + us / iters
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:8]
    return sum(per_kernel.values()) / 1e3, [[name[:80], round(us, 1)] for name, us in top]


def _child(op: str, shape: str, impl: str) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    _apply_tuning(op, impl)
    step, _, n_bytes = _build(op, SHAPES[shape], impl)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        # Back-to-back steps, so host-side launch latency overlaps the GPU work as in training.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = statistics.median(times)
    kernel_ms, kernels = _kernel_ms(step)
    # The fused losses take milliseconds: launch overhead does not matter there (and Liger's
    # syncs with the host), so only the memory-bound ops are replayed as CUDA graphs.
    graph_ms = _graph_ms(step) if n_bytes else None
    return {"op": op, "shape": shape, "impl": impl, "ms": ms, "graph_ms": graph_ms,
            "kernel_ms": kernel_ms, "kernels": kernels, "peak_gib": peak / 2**30,
            "bytes": n_bytes, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__}  # fmt: skip


# ----------------------------------------------------------------------------- parent process


def _run_variant(variant: tuple[str, str, str], out_dir: Path, timeout: float) -> dict[str, Any]:
    op, shape, impl = variant
    name = f"{op}-{shape}-{impl}"
    result_path = out_dir / f"{name}.json"
    env = dict(os.environ)
    src = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]
    env["PYTHONPATH"] = os.pathsep.join([*src, str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", op, shape, impl, "--result", str(result_path)]
    started = time.monotonic()
    with open(out_dir / f"{name}.log", "wb") as log:
        try:
            code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code == 0 and result_path.exists():
        return json.loads(result_path.read_text())
    tail = (out_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    note = (
        "liger_kernel not importable"
        if "liger_kernel" in tail[0]
        else f"failed ({code}): {tail[0][:120]}"
    )
    return {"op": op, "shape": shape, "impl": impl, "error": note,
            "seconds": time.monotonic() - started}  # fmt: skip


def _table(results: list[dict[str, Any]]) -> str:
    gpu = next((r["gpu"] for r in results if "gpu" in r), "unknown GPU")
    bandwidth = next((v for k, v in PEAK_BANDWIDTH.items() if k in gpu), None)
    eager = {(r["op"], r["shape"]): r for r in results if r["impl"] == "eager" and "ms" in r}
    lines = [
        f"GPU: {gpu}; torch {next((r['torch'] for r in results if 'torch' in r), '?')}; "
        "launched = back-to-back Python steps, graph = one CUDA graph replay, kernels = sum of the "
        "kernels' own durations (torch.profiler); roofline % from the graph and kernel times",
        "",
        "| op | shape | impl | launched ms | graph ms | kernels ms | vs eager | peak GiB | "
        "memory vs eager | MB moved | % roofline graph | % roofline kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        head = f"| {r['op']} | {r['shape']} | {r['impl']} |"
        if "ms" not in r:
            lines.append(f"{head} {r['error']} | | | | | | | | |")
            continue
        ref = eager.get((r["op"], r["shape"]))
        # Memory-bound ops compare GPU time (graph); the losses compare the launched time.
        key = "graph_ms" if r.get("graph_ms") and ref and ref.get("graph_ms") else "ms"
        speed = f"{ref[key] / r[key]:.2f}x" if ref else ""
        memory = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref and ref["peak_gib"] > 0 else ""
        mb = roof_graph = roof_kernels = ""
        if r["bytes"] and bandwidth:
            mb = f"{r['bytes'] / 1e6:.0f}"
            if r.get("graph_ms"):
                roof_graph = f"{100 * r['bytes'] / (r['graph_ms'] * 1e-3) / bandwidth:.0f}%"
            roof_kernels = f"{100 * r['bytes'] / (r['kernel_ms'] * 1e-3) / bandwidth:.0f}%"
        graph = f"{r['graph_ms']:.3f}" if r.get("graph_ms") else ""
        lines.append(
            f"{head} {r['ms']:.3f} | {graph} | {r['kernel_ms']:.3f} | {speed} | "
            f"{r['peak_gib']:.3f} | {memory} | {mb} | {roof_graph} | {roof_kernels} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument(
        "--sweep", default="", help="extra op:impl variants, e.g. rope:automodel@num_warps=8"
    )
    parser.add_argument(
        "--variants", default="", help="explicit op:shape:impl list (overrides the others)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per variant")
    parser.add_argument("--child", nargs=3, metavar=("OP", "SHAPE", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _child(*args.child)
        Path(args.result).write_text(json.dumps(result))
        return
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = [entry for entry in args.sweep.split(",") if entry]
    variants = _variants(args.ops.split(","), args.shapes.split(","), args.impls.split(","), sweep)
    if args.variants:  # an explicit list, run in its order
        variants = [tuple(entry.split(":", 2)) for entry in args.variants.split(",")]  # type: ignore[misc]
    results = []
    for variant in variants:
        result = _run_variant(variant, out_dir, args.timeout)
        print(json.dumps(result), flush=True)
        results.append(result)
    table = _table(results)
    (out_dir / "kernels_bench.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
