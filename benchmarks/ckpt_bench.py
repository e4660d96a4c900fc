"""Merge and reshard throughput and peak RSS of automodel-ckpt against torch's
``consolidate_safetensors_files`` and a plain file copy of the same bytes, on one synthetic checkpoint.

    uv run python benchmarks/ckpt_bench.py                 # 4 GiB, 4 simulated ranks
    uv run python benchmarks/ckpt_bench.py --gib 8 --ranks 8 --shard 2GB

The input is the per-rank sharded safetensors layout that DCP's ``HuggingFaceStorageWriter`` writes
with ``save_distributed=True`` (``shard-0000r-model-00001-of-00001.safetensors``, ``DCP_SHARDING_INFO``
offsets in each header): FSDP-style row shards of 2D fp32 weights plus rank-0-only 1D norms. Every
variant runs in its own subprocess on a warm page cache, after a warm-up copy, and ends with every
output file fsynced, so all of them pay the same disk. Throughput counts tensor bytes. Peak RSS is the
subprocess's ``ru_maxrss``; "growth" subtracts the RSS after imports. Results and logs go to ``$OUT``
(or a temporary folder); a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_BYTES = 4096 * 4  # one row of a [rows, 4096] fp32 weight


def _write_rank_file(
    path: Path, tensors: list[tuple[str, list[int], list[int]]], seed: int
) -> None:
    """Writes one rank's file: (name, local shape, global offsets) per tensor, random fp32 data."""
    import torch

    header: dict[str, object] = {}
    sharding = {}
    cursor = 0
    for name, shape, offsets in tensors:
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [cursor, cursor + nbytes]}
        sharding[name] = {"saved_offsets": offsets}
        cursor += nbytes
    header["__metadata__"] = {"DCP_SHARDING_INFO": json.dumps(sharding), "format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _name, shape, _ in tensors:
            f.write(torch.randn(shape, generator=generator).numpy().tobytes())


def make_input(folder: Path, gib: float, ranks: int) -> tuple[int, list[str]]:
    """Creates the per-rank checkpoint; returns (tensor bytes, tensor names in order)."""
    folder.mkdir(parents=True)
    rows = 4096
    layers = max(1, round(gib * 2**30 / (rows * ROW_BYTES)))
    names = []
    per_rank: list[list[tuple[str, list[int], list[int]]]] = [[] for _ in range(ranks)]
    chunk = math.ceil(rows / ranks)
    for layer in range(layers):
        weight, norm = f"model.layers.{layer}.mlp.weight", f"model.layers.{layer}.norm.weight"
        names += [weight, norm]
        for r in range(ranks):
            start = r * chunk
            size = max(0, min(chunk, rows - start))
            if size:
                per_rank[r].append((weight, [size, 4096], [start, 0]))
        per_rank[0].append((norm, [4096], [0]))
    for r in range(ranks):
        _write_rank_file(
            folder / f"shard-{r + 1:05d}-model-00001-of-00001.safetensors", per_rank[r], r
        )
    return layers * (rows * ROW_BYTES + ROW_BYTES), names


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(
    variant: str, src: Path, dst: Path, shard: str, names: list[str]
) -> dict[str, float]:
    """Runs one variant in this process; returns seconds and RSS figures."""
    import torch

    baseline = _peak_rss()
    start = time.perf_counter()
    if variant.startswith("plain copy"):
        dst.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)
    elif variant == "torch consolidate_safetensors_files":
        # torch's own merge of per-rank files (what HuggingFaceStorageWriter calls in finish()).
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files,
        )

        from automodel.ckpt._layout import plan_layout
        from automodel.ckpt._size import parse_size

        # Same output files as automodel's merge: the same packing of the same tensor order.
        shapes = json.loads((dst.parent / "shapes.json").read_text())
        layout = plan_layout(
            [(n, torch.float32, tuple(shapes[n])) for n in names], parse_size(shard)
        )
        mapping = {n: layout.tensors[n].file + 1 for n in names}
        dst.mkdir(parents=True)
        consolidate_safetensors_files(str(src), str(dst), mapping, num_threads=1)
    elif variant == "automodel merge":
        from automodel.ckpt import merge

        merge(src, dst, max_shard_size=shard)
    elif variant == "automodel reshard":
        from automodel.ckpt import reshard

        reshard(src, dst, max_shard_size=shard)
    elif variant == "automodel reshard --dtype bf16":
        from automodel.ckpt import reshard

        reshard(src, dst, max_shard_size=shard, dtype="bf16")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    _fsync_tree(dst)
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    return {"seconds": seconds, "peak_rss": peak, "rss_growth": peak - baseline}


def _spawn(variant: str, src: Path, dst: Path, shard: str, names_file: Path, log: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--shard",
        shard,
        "--names",
        str(names_file),
    ]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}, see {log.name}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB")
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks (input files)")
    parser.add_argument("--shard", default="1GB", help="output max_shard_size")
    parser.add_argument("--variant")
    parser.add_argument("--src")
    parser.add_argument("--dst")
    parser.add_argument("--names")
    args = parser.parse_args()
    if args.variant:  # child process
        names = json.loads(Path(args.names).read_text())
        print(
            json.dumps(run_variant(args.variant, Path(args.src), Path(args.dst), args.shard, names))
        )
        return

    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="ckpt-bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        src = work / "per_rank"
        nbytes, names = make_input(src, args.gib, args.ranks)
        names_file = work / "names.json"
        names_file.write_text(json.dumps(names))
        shapes = {n: ([4096, 4096] if n.endswith("mlp.weight") else [4096]) for n in names}
        (work / "shapes.json").write_text(json.dumps(shapes))
        _fsync_tree(src)
        # Warm-up: read the input once so every variant starts from the same page cache.
        _spawn(
            "plain copy (warm-up)", src, work / "warmup", args.shard, names_file, out / "warmup.log"
        )
        shutil.rmtree(work / "warmup")

        rows = []
        merged = work / "merged"
        plan = [
            ("plain copy", src, work / "copy1", "merge input"),
            ("torch consolidate_safetensors_files", src, work / "torch", "merge"),
            ("automodel merge", src, merged, "merge"),
            ("plain copy", merged, work / "copy2", "reshard input"),
            ("automodel reshard", merged, work / "resharded", "reshard to 2x smaller files"),
            ("automodel reshard --dtype bf16", merged, work / "bf16", "reshard + cast to bf16"),
        ]
        from automodel.ckpt._size import parse_size

        half = str(parse_size(args.shard) // 2)
        for variant, source, dst, task in plan:
            shard = half if task.startswith("reshard") else args.shard
            result = _spawn(variant, source, dst, shard, names_file, out / f"{dst.name}.log")
            rows.append((task, variant, result))
        # Correctness of the compared outputs, then free the disk.
        from automodel.ckpt import diff

        same = diff(work / "torch", merged).equal if (work / "torch").exists() else False
        for name in ("copy1", "copy2", "torch", "resharded", "bf16"):
            shutil.rmtree(work / name, ignore_errors=True)

        results = {
            "bytes": nbytes,
            "ranks": args.ranks,
            "shard": args.shard,
            "torch_output_equals_automodel": same,
            "rows": [{"task": t, "variant": v, **r} for t, v, r in rows],
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        }
        (out / "ckpt_bench.json").write_text(json.dumps(results, indent=2))
        print(
            f"checkpoint: {nbytes / 1e9:.2f} GB of tensors, {args.ranks} per-rank input files, "
            f"output shards {args.shard}; torch output == automodel output: {same}"
        )
        print()
        print("| task | variant | seconds | GB/s | peak RSS (MB) | RSS growth (MB) |")
        print("|---|---|---|---|---|---|")
        for task, variant, r in rows:
            if "error" in r:
                print(f"| {task} | {variant} | {r['error']} | | | |")
                continue
            gbps = nbytes / r["seconds"] / 1e9  # input tensor bytes per second
            print(
                f"| {task} | {variant} | {r['seconds']:.2f} | {gbps:.2f} | "
                f"{r['peak_rss'] / 1e6:.0f} | {r['rss_growth'] / 1e6:.0f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
