"""Benchmark automodel.kernels' dense ops against torch eager, torch.compile and Liger-Kernel.

Run from the repository root on a GPU machine (packages need not be installed)::

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :)tests python benchmarks/kernels_bench.py
    python benchmarks/kernels_bench.py --ops rms_norm,linear_cross_entropy --shapes 8b --impls eager,automodel
    python benchmarks/kernels_bench.py --variants rms_norm:8b:automodel,rms_norm:8b:automodel@num_stages=2

Every (op, shape, implementation) runs in its own subprocess, so a crash or an out-of-memory error in
one never takes down the others; each writes a JSON result (and the log) to ``$OUT`` when set. The
markdown tables come last on stdout. The GPU runs one variant at a time; the next variant's process
starts and imports while the current one measures. ``--warm-only --jobs N`` builds every compiled
variant N at a time (nothing timed) so that a later timed run reads Triton's and inductor's caches;
``--priority`` runs every shape's main rows first, then torch.compile, then sweeps, and ``--budget``
stops starting variants after that many seconds (they are reported as not run);
``--tables-from LOG`` rebuilds the tables from the JSON lines of a run's stdout.

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
the ``copy`` row (a plain clone) shows the practical ceiling, and the second table divides by the
copy row's bandwidth of the same run and shape as well (the empirical roofline). ``--sweep``/``--variants`` add launch
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
# Extra automodel variants of linear_cross_entropy, "automodel_" + "_"-joined parts: chunk<N> (tokens
# per chunk) and chunks / vocab (weight_grad "chunks" / "vocab_blocks"; default "auto").
LCE_CHUNKS = ("chunk256_chunks", "chunk256_vocab", "chunk512_chunks", "chunk512_vocab")
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
BF16 = 2


def _variants(
    ops: list[str], shapes: list[str], impls: list[str], sweep: list[str] = ()
) -> list[tuple[str, str, str]]:
    """Returns every (op, shape, impl) to run; ``sweep`` adds ``op:impl`` (each shape) entries.

    A sweep entry ``op:shape:impl`` adds that variant at that shape only.
    """
    out = []
    for shape in shapes:
        for op in ops:
            for impl in impls:
                if op != "copy" or impl == "eager":  # copy: the bandwidth a plain clone reaches
                    out.append((op, shape, impl))
            if op == "linear_cross_entropy" and "automodel" in impls:
                out += [(op, shape, f"automodel_{variant}") for variant in LCE_CHUNKS]
            for entry in sweep:  # op:impl at every shape, op:shape:impl at that one
                parts = entry.split(":")
                if parts[0] == op and (len(parts) == 2 or parts[1] == shape):
                    out.append((op, shape, parts[-1]))
    return out


def _apply_tuning(op: str, impl: str) -> None:
    """Sets the launch geometry an ``automodel@key=value+key=value`` variant names."""
    if "@" not in impl:
        return
    if op in ("rms_norm", "add_rms_norm"):
        from automodel.kernels._triton.norm import TUNING as tuning
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
            chunk, weight_grad = None, "auto"
            for part in impl.split("_")[1:]:  # see LCE_CHUNKS
                if part in ("chunks", "vocab"):
                    weight_grad = "chunks" if part == "chunks" else "vocab_blocks"
                elif part.startswith("chunk"):
                    chunk = int(part.removeprefix("chunk"))
                else:
                    raise ValueError(f"variant {impl!r}: unknown part {part!r}; see LCE_CHUNKS")

            def forward() -> Any:
                return K.linear_cross_entropy(
                    hidden, weight, labels, chunk_size=chunk, weight_grad=weight_grad,
                    backend="triton",
                )[0]  # fmt: skip
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
        from automodel.kernels._triton.norm import backward_geometry

        rows = backward_geometry(torch.device("cuda", 0), tokens, hidden)[0]
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


def _preload(impl: str) -> None:
    """Imports what a variant needs before its turn (no CUDA work: the GPU may be timing another)."""
    import torch

    import automodel.kernels  # noqa: F401

    if impl == "liger":  # liger_kernel.transformers imports lazily: name what the ops use
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: F401
        from liger_kernel.transformers import (  # noqa: F401
            LigerFusedAddRMSNorm,
            LigerRMSNorm,
            liger_rotary_pos_emb,
        )
    if impl == "compile":
        import torch._inductor.compile_fx  # noqa: F401


def _child(op: str, shape: str, impl: str, warm_only: bool = False) -> dict[str, Any]:
    """Returns one variant's measurements (``warm_only``: only builds it and runs 3 steps)."""
    import torch

    torch.manual_seed(0)
    _apply_tuning(op, impl)
    started = time.monotonic()
    step, _, n_bytes = _build(op, SHAPES[shape], impl)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if warm_only:  # fills the Triton and inductor caches the timed run then reads
        return {"op": op, "shape": shape, "impl": impl, "warm_s": time.monotonic() - started}
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


class _Launch:
    """One variant's child process, started ahead of its turn (imports only until ``go`` exists)."""

    def __init__(self, variant: tuple[str, str, str], out_dir: Path, warm_only: bool = False):
        self.variant = variant
        op, shape, impl = variant
        self.name = f"{op}-{shape}-{impl}" + ("-warm" if warm_only else "")
        self.result_path = out_dir / f"{self.name}.json"
        self.log_path = out_dir / f"{self.name}.log"
        self.go = out_dir / f"{self.name}.go"
        env = dict(os.environ)
        src = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]
        env["PYTHONPATH"] = os.pathsep.join([*src, str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, __file__, "--child", op, shape, impl, "--result",
               str(self.result_path), "--go", str(self.go)]  # fmt: skip
        if warm_only:
            cmd.append("--warm-only")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def start(self) -> None:
        """Lets the child go on to the GPU work; its timeout counts from here."""
        self.go.touch()
        self.started = time.monotonic()

    def finish(self, timeout: float) -> dict[str, Any]:
        """Returns the child's result, or an ``error`` entry saying why there is none."""
        try:
            code: int | str = self.proc.wait(
                timeout=max(1.0, timeout - (time.monotonic() - self.started))
            )
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = "timeout"
        self._log.close()
        op, shape, impl = self.variant
        if code == 0 and self.result_path.exists():
            return json.loads(self.result_path.read_text())
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        note = (
            "liger_kernel not importable"
            if "liger_kernel" in tail[0]
            else f"failed ({code}): {tail[0][:120]}"
        )
        return {"op": op, "shape": shape, "impl": impl, "error": note,
                "seconds": time.monotonic() - self.started}  # fmt: skip

    def cancel(self, why: str) -> dict[str, Any]:
        """Stops the child before its turn; returns the ``error`` entry saying why."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()
        op, shape, impl = self.variant
        return {"op": op, "shape": shape, "impl": impl, "error": why}


def _run_timed(
    variants: list[tuple[str, str, str]], out_dir: Path, timeout: float, budget: float
) -> list[dict[str, Any]]:
    """Returns every variant's result, run one at a time on the GPU, in the given order.

    While one variant runs, the next one's process already starts and imports (Python, torch,
    Triton, Liger: seconds each) and waits for its turn, so the GPU work runs back to back. No
    variant starts once ``budget`` seconds have passed (0: no budget); those report why.
    """
    results: list[dict[str, Any]] = []
    begun = time.monotonic()
    upcoming = _Launch(variants[0], out_dir) if variants else None
    for index in range(len(variants)):
        current = upcoming
        assert current is not None
        if budget and time.monotonic() - begun > budget:
            results.append(current.cancel(f"not run: past the {budget:.0f} s --budget"))
            upcoming = _Launch(variants[index + 1], out_dir) if index + 1 < len(variants) else None
            continue
        current.start()
        upcoming = _Launch(variants[index + 1], out_dir) if index + 1 < len(variants) else None
        result = current.finish(timeout)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def _warm(variants: list[tuple[str, str, str]], out_dir: Path, timeout: float, jobs: int) -> None:
    """Builds and runs each compiled variant ``jobs`` at a time, filling the kernel caches.

    Triton's and inductor's on-disk caches (and inductor's autotuning choices) are shared by every
    later process: a timed torch.compile variant then compiles in seconds instead of tens of them.
    Nothing is timed here (concurrent variants share the GPU).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(variant: tuple[str, str, str]) -> str:
        launch = _Launch(variant, out_dir, warm_only=True)
        launch.start()
        result = launch.finish(timeout)
        return f"warm {launch.name}: " + (
            f"{result['warm_s']:.1f} s" if "warm_s" in result else result["error"]
        )

    # eager runs precompiled torch ops; torch.compile (the slowest to build) goes first
    needing = sorted((v for v in variants if v[2] != "eager"), key=lambda v: v[2] != "compile")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for line in pool.map(one, needing):
            print(line, flush=True)


def _by_priority(variants: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Returns the variants reordered: every shape's main rows, then torch.compile, then sweeps."""

    def rank(variant: tuple[str, str, str]) -> int:
        impl = variant[2]
        return 1 if impl == "compile" else 2 if "@" in impl else 0

    return sorted(variants, key=rank)


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


def _vs_copy_table(results: list[dict[str, Any]]) -> str:
    """Returns the bandwidth table: each row's GB/s against the spec and against the copy row.

    Two rooflines: the card's spec bandwidth, and the bandwidth the ``copy`` row (a plain clone)
    reached at the same shape in the same run: what a memory-bound kernel can achieve here (the
    empirical roofline). Graph times compare with the copy's graph time, kernel times with its
    kernel time.
    """
    gpu = next((r["gpu"] for r in results if "gpu" in r), "unknown GPU")
    spec = next((v for k, v in PEAK_BANDWIDTH.items() if k in gpu), None)
    copies = {r["shape"]: r for r in results if r["op"] == "copy" and "kernel_ms" in r}
    lines = [
        "| op | shape | impl | graph ms | kernels ms | TB/s graph | TB/s kernels | % spec graph "
        "| % spec kernels | % copy graph | % copy kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "kernel_ms" not in r or not r.get("bytes"):
            continue
        tb_graph = r["bytes"] / (r["graph_ms"] * 1e-3) / 1e12 if r.get("graph_ms") else None
        tb_kernels = r["bytes"] / (r["kernel_ms"] * 1e-3) / 1e12
        copy = copies.get(r["shape"])
        copy_graph = copy["bytes"] / (copy["graph_ms"] * 1e-3) / 1e12 if copy and copy.get("graph_ms") else None  # fmt: skip
        copy_kernels = copy["bytes"] / (copy["kernel_ms"] * 1e-3) / 1e12 if copy else None

        def pct(value: float | None, ceiling: float | None) -> str:
            return f"{100 * value / ceiling:.0f}%" if value and ceiling else ""

        graph = f"{r['graph_ms']:.3f}" if r.get("graph_ms") else ""
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {graph} | {r['kernel_ms']:.3f} | "
            f"{tb_graph or 0:.2f} | {tb_kernels:.2f} | {pct(tb_graph, spec and spec / 1e12)} | "
            f"{pct(tb_kernels, spec and spec / 1e12)} | {pct(tb_graph, copy_graph)} | "
            f"{pct(tb_kernels, copy_kernels)} |"
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
    parser.add_argument(
        "--budget", type=float, default=0.0, help="start no variant after this many s (0: none)"
    )
    parser.add_argument(
        "--priority",
        action="store_true",
        help="run every shape's main rows first, then torch.compile, then sweeps (table order kept)",
    )
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="only build and run each non-eager variant once, --jobs at a time (fills the caches)",
    )
    parser.add_argument("--jobs", type=int, default=4, help="parallel processes for --warm-only")
    parser.add_argument(
        "--tables-from", help="print the tables of the JSON result lines in this log (no GPU)"
    )
    parser.add_argument("--child", nargs=3, metavar=("OP", "SHAPE", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.go:  # imports first, then waits for the parent's go (at most 10 minutes)
            _preload(args.child[2])
            deadline = time.monotonic() + 600
            while not Path(args.go).exists():
                if time.monotonic() > deadline:
                    sys.exit("no go from the parent within 600 s")
                time.sleep(0.002)
        result = _child(*args.child, warm_only=args.warm_only)
        Path(args.result).write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skips the interpreter's teardown (a second of the next variant's turn)
    if args.tables_from:
        lines = Path(args.tables_from).read_text().splitlines()
        results = [json.loads(line) for line in lines if line.startswith('{"op"')]
        print(_table(results) + "\n\n" + _vs_copy_table(results))
        return
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = [entry for entry in args.sweep.split(",") if entry]
    variants = _variants(args.ops.split(","), args.shapes.split(","), args.impls.split(","), sweep)
    if args.variants:  # an explicit list, run in its order
        variants = [tuple(entry.split(":", 2)) for entry in args.variants.split(",")]  # type: ignore[misc]
    if args.warm_only:
        _warm(variants, out_dir, args.timeout, args.jobs)
        return
    order = _by_priority(variants) if args.priority else variants
    by_variant = dict(zip(order, _run_timed(order, out_dir, args.timeout, args.budget)))
    results = [by_variant[v] for v in variants]
    table = _table(results) + "\n\n" + _vs_copy_table(results)
    (out_dir / "kernels_bench.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
