"""The ``automodel-ckpt`` command line: inspect, verify, merge, reshard, convert and diff checkpoints.

Importing this module loads only click; torch is imported when a command runs, so ``--help`` is
instant. Bad input (missing path, not a checkpoint, corrupt or truncated file, destination problems,
unsupported dtype) prints one ``error: ...`` line on stderr and exits with status 2; ``diff`` exits 1
when the checkpoints differ and ``verify`` exits 1 when it finds problems.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click

_EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(_EXIT_BAD_INPUT)


def _one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns CheckpointError/OSError/ValueError into a one-line message and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        except (ValueError, TypeError) as e:  # CheckpointError is a ValueError
            _fail(" ".join(str(e).split()))

    return wrapper


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    if not enabled or total <= 0 or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as bar:
        yield bar.update


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload, indent=2) if as_json else text)


def _total_bytes(path: str) -> int:
    from automodel.ckpt.inspection import inspect

    return inspect(path).total_bytes


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
_dtype_option = click.option(
    "--dtype",
    default=None,
    help="Cast floating-point tensors: float32, bfloat16, float16 (fp32/bf16/fp16).",
)
_overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace DST if it exists (refused otherwise)."
)
_shard_option = click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output file, e.g. 2GB, 500MiB.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automodel-ckpt")
def main() -> None:
    """Inspect, verify, merge, reshard, convert and diff Hugging Face / DCP checkpoints.

    Every tool streams (one tensor or one output shard in memory) and never writes over its source.
    """


@main.command("inspect")
@click.argument("path")
@_json_option
@_one_line_errors
def inspect_command(path: str, as_json: bool) -> None:
    """Show a checkpoint's format, files, tensors and parameter count."""
    from automodel.ckpt._format_detection import detect_format

    detect_format(Path(path))
    from automodel.ckpt.inspection import inspect

    info = inspect(path)
    lines = [
        f"{info.path}: {info.format}, {len(info.tensors)} tensors, "
        f"{info.num_parameters:,} parameters, {info.total_bytes / 1e6:.2f} MB in {len(info.files)} file(s)",
        "dtypes: " + ", ".join(f"{k} ({v:,})" for k, v in info.dtypes.items()),
    ]
    lines += [f"  {t.name}  {t.dtype.removeprefix('torch.')}  {t.shape}" for t in info.tensors]
    _emit(as_json, info.as_dict(), "\n".join(lines))


@main.command("verify")
@click.argument("path")
@_json_option
@_one_line_errors
def verify_command(path: str, as_json: bool) -> None:
    """Check index <-> files, headers, truncation, every tensor, and SHA256SUMS when present.

    Exits 0 when the checkpoint is sound, 1 when problems were found.
    """
    from automodel.ckpt._format_detection import detect_format

    detect_format(Path(path))  # a missing path or a non-checkpoint is bad input (exit 2)
    from automodel.ckpt.verification import verify

    try:
        total = _total_bytes(path)
    except ValueError:
        total = 0  # structural problems: verify reports them
    with _progress(total, "verifying", not as_json) as progress:
        report = verify(path, progress=progress)
    text = (
        f"{path}: OK ({report.tensors_checked} tensors, {report.bytes_checked / 1e6:.2f} MB read, "
        f"{report.checksums_checked} checksums)"
        if report.ok
        else f"{path}: {len(report.problems)} problem(s)\n"
        + "\n".join(f"  - {p}" for p in report.problems)
    )
    _emit(as_json, report.as_dict(), text)
    sys.exit(0 if report.ok else 1)


def _rewrite(kind: str, src: str, dst: str, as_json: bool, **kwargs: Any) -> None:
    from automodel.ckpt._destination import check_destination
    from automodel.ckpt._format_detection import detect_format

    # Path mistakes are caught before torch is imported; free space is checked again with sizes.
    detect_format(Path(src))
    check_destination(Path(src), Path(dst), overwrite=kwargs["overwrite"], needed_bytes=0)
    from automodel.ckpt import rewrite

    with _progress(_total_bytes(src), kind, not as_json) as progress:
        if kind == "convert":
            out = rewrite.convert(src, dst, progress=progress, **kwargs)
        else:
            out = getattr(rewrite, kind)(src, dst, progress=progress, **kwargs)
    files = sorted(p.name for p in out.iterdir())
    _emit(
        as_json,
        {"source": src, "destination": str(out), "files": files},
        f"{kind}: {src} -> {out} ({len(files)} files)",
    )


@main.command("merge")
@click.argument("src")
@click.argument("dst")
@_shard_option
@_dtype_option
@_overwrite_option
@click.option("--checksums", is_flag=True, help="Also write a SHA256SUMS manifest.")
@_json_option
@_one_line_errors
def merge_command(
    src: str,
    dst: str,
    max_shard_size: str,
    dtype: str | None,
    overwrite: bool,
    checksums: bool,
    as_json: bool,
) -> None:
    """Consolidate SRC (DCP, per-rank safetensors or HF folder) into a HF folder DST.

    Config, generation config, tokenizer files and chat template are copied along.
    """
    _rewrite(
        "merge",
        src,
        dst,
        as_json,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
        checksums=checksums,
    )


@main.command("reshard")
@click.argument("src")
@click.argument("dst")
@_shard_option
@_dtype_option
@_overwrite_option
@click.option("--checksums", is_flag=True, help="Also write a SHA256SUMS manifest.")
@_json_option
@_one_line_errors
def reshard_command(
    src: str,
    dst: str,
    max_shard_size: str,
    dtype: str | None,
    overwrite: bool,
    checksums: bool,
    as_json: bool,
) -> None:
    """Rewrite SRC as a HF folder DST with files of at most --max-shard-size."""
    _rewrite(
        "reshard",
        src,
        dst,
        as_json,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
        checksums=checksums,
    )


@main.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--to", "to", type=click.Choice(["dcp", "safetensors"]), required=True, help="Output format."
)
@_shard_option
@_dtype_option
@_overwrite_option
@_json_option
@_one_line_errors
def convert_command(
    src: str,
    dst: str,
    to: str,
    max_shard_size: str,
    dtype: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert SRC to a DCP folder or a HF safetensors folder DST."""
    _rewrite(
        "convert",
        src,
        dst,
        as_json,
        to=to,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
    )


@main.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance.")
@_json_option
@_one_line_errors
def diff_command(a: str, b: str, atol: float, rtol: float, as_json: bool) -> None:
    """Compare two checkpoints: missing/extra keys and per-tensor max abs/rel difference.

    Exits 0 when they are equal within tolerance, 1 when they differ.
    """
    from automodel.ckpt._format_detection import detect_format

    detect_format(Path(a))
    detect_format(Path(b))
    from automodel.ckpt.comparison import diff

    total = _total_bytes(a) + _total_bytes(b)
    with _progress(total, "comparing", not as_json) as progress:
        report = diff(a, b, atol=atol, rtol=rtol, progress=progress)
    lines = [f"{a} vs {b}: {'equal' if report.equal else 'DIFFERENT'} (atol={atol}, rtol={rtol})"]
    lines += [f"  only in A: {k}" for k in report.only_in_a]
    lines += [f"  only in B: {k}" for k in report.only_in_b]
    lines += [f"  shape: {m}" for m in report.shape_mismatches]
    lines += [
        f"  {t.name}: max abs {t.max_abs:.3g}, max rel {t.max_rel:.3g}" for t in report.differing
    ]
    _emit(as_json, report.as_dict(), "\n".join(lines))
    sys.exit(0 if report.equal else 1)


if __name__ == "__main__":
    main()
