"""The ``automodel`` command line: run YAML recipes locally, under torchrun, or on SLURM."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_LAUNCH_HELP = "Processes per node (default: all visible GPUs, or 1 on CPU)."


def _split(args: tuple[str, ...], shortcut: str | None) -> tuple[str, list[str]]:
    """Returns (config path, overrides) from positional args; the bundled default when no file."""
    from automodel.recipes._bundled import default_config

    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    if shortcut is None:
        raise click.UsageError("expected CONFIG.yaml as the first argument")
    return str(default_config(shortcut)), list(args)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns user errors (config, data, run) into a one-line message and exit code 2/1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from automodel.recipes.config import ConfigError
        from automodel.recipes.data import DataError
        from automodel.recipes.train import RunError

        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (DataError, RunError, ValueError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


def _launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--rdzv-endpoint", default=None, help="HOST:PORT of the first node (multi-node)."
    )(fn)
    fn = click.option(
        "--node-rank", type=int, default=0, show_default=True, help="This node's rank."
    )(fn)
    fn = click.option("--nnodes", type=int, default=1, show_default=True, help="Number of nodes.")(
        fn
    )
    fn = click.option("--nproc-per-node", type=int, default=None, help=_LAUNCH_HELP)(fn)
    return fn


def _run(
    config: str,
    overrides: list[str],
    expect: str | None,
    nproc_per_node: int | None,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str | None,
) -> None:
    from automodel.recipes._launch import default_nproc, relaunch, torchrun_args, under_torchrun
    from automodel.recipes._registry import RECIPES
    from automodel.recipes.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    if expect is not None and cfg.recipe != expect:
        raise ConfigError(
            f"{config}: recipe is {cfg.recipe!r}, not {expect!r}; use `automodel run`"
        )
    nproc = nproc_per_node if nproc_per_node is not None else default_nproc()
    if not under_torchrun() and (nproc > 1 or nnodes > 1):
        launcher = torchrun_args(nproc, nnodes, node_rank, rdzv_endpoint)
        relaunch(launcher, ["run", config, *overrides])
    output = RECIPES[cfg.recipe].runner()(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(str(Path(output).resolve()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automodel-recipes")
def main() -> None:
    """Train and fine-tune Hugging Face models from YAML recipes."""


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config")
@click.argument("overrides", nargs=-1)
@_launch_options
@_friendly
def run(config: str, overrides: tuple[str, ...], **launch: Any) -> None:
    """Run the recipe named in CONFIG.yaml, with section.key=value OVERRIDES."""
    _run(config, list(overrides), None, **launch)


def _shortcut(name: str, recipe: str, doc: str) -> None:
    @main.command(name=name, help=doc, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1)
    @_launch_options
    @_friendly
    def command(args: tuple[str, ...], **launch: Any) -> None:
        config, overrides = _split(args, name)
        _run(config, overrides, recipe, **launch)


_shortcut(
    "finetune",
    "sft",
    "Fine-tune (SFT/LoRA): [CONFIG.yaml] [OVERRIDES]; no config = the bundled tiny default.",
)
_shortcut(
    "pretrain",
    "pretrain",
    "Pretrain: [CONFIG.yaml] [OVERRIDES]; no config = the bundled tiny default.",
)
_shortcut(
    "distill",
    "distill",
    "Distill a teacher into a student: [CONFIG.yaml] [OVERRIDES]; no config = bundled default.",
)
_shortcut(
    "benchmark",
    "benchmark",
    "Benchmark on synthetic tokens: [CONFIG.yaml] [OVERRIDES]; no config = bundled default.",
)


@main.group()
def config() -> None:
    """Inspect recipe configs: show, validate, schema."""


@config.command()
@click.argument("path")
@click.argument("overrides", nargs=-1)
@_friendly
def show(path: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults filled in, overrides and ${VAR}s applied)."""
    import yaml

    from automodel.recipes.config import load_config

    cfg = load_config(path, list(overrides))
    click.echo(
        yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), nl=False
    )


@config.command()
@click.argument("paths", nargs=-1, required=True)
@_friendly
def validate(paths: tuple[str, ...]) -> None:
    """Check one or more configs; print each one's errors (exit 2 if any)."""
    from automodel.recipes.config import ConfigError, load_config

    failed = False
    for path in paths:
        try:
            load_config(path)
            click.echo(f"{path}: ok")
        except ConfigError as e:
            failed = True
            for line in str(e).splitlines():
                click.echo(f"{path}: {line}", err=True)
    if failed:
        sys.exit(2)


@config.command()
def schema() -> None:
    """Print the JSON schema of recipe configs (for editors and validation tools)."""
    from automodel.recipes.config import RecipeConfig

    click.echo(json.dumps(RecipeConfig.model_json_schema(by_alias=True), indent=2))


@main.command()
def recipes() -> None:
    """List the recipes and the example configs."""
    from automodel.recipes._bundled import BUNDLED_DIR
    from automodel.recipes._registry import RECIPES

    click.echo("recipes:")
    for r in RECIPES.values():
        via = f"automodel {r.shortcut}" if r.shortcut else "automodel run"
        click.echo(f"  {r.name:<15} {r.summary}  [{via}]")
    click.echo("bundled defaults:")
    for path in sorted((BUNDLED_DIR / "configs").glob("*.yaml")):
        click.echo(f"  {path.stem:<15} {path}")
    examples = Path.cwd() / "examples"
    if examples.is_dir():
        click.echo("examples:")
        for path in sorted(examples.glob("*.yaml")):
            click.echo(f"  {path.relative_to(Path.cwd())}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--nodes", type=int, required=True, help="Number of nodes.")
@click.option("--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node.")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--time", "time_limit", default=None, help="Time limit, e.g. 04:00:00.")
@click.option(
    "--container", default=None, help="Container image (pyxis/enroot srun --container-image)."
)
@click.option(
    "--port", type=int, default=29500, show_default=True, help="Rendezvous port on the first node."
)
@click.option("--dry-run", is_flag=True, help="Print the sbatch script instead of submitting it.")
@_friendly
def slurm(
    config: str, overrides: tuple[str, ...], nodes: int, gpus_per_node: int, partition: str | None,
    time_limit: str | None, container: str | None, port: int, dry_run: bool,
) -> None:  # fmt: skip
    """Write an sbatch script for CONFIG.yaml and submit it (or print it with --dry-run)."""
    from automodel.recipes._slurm import sbatch_script
    from automodel.recipes.config import load_config

    load_config(config, list(overrides))  # fail here, not after hours in the queue
    script = sbatch_script(
        str(Path(config).resolve()), list(overrides), nodes=nodes, gpus_per_node=gpus_per_node,
        partition=partition, time=time_limit, container=container, port=port,
    )  # fmt: skip
    if dry_run:
        click.echo(script, nl=False)
        return
    path = Path(f"automodel-{os.environ.get('AUTOMODEL_RUN_ID', os.getpid())}.sbatch")
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", str(path)], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise ValueError(
            f"sbatch not found: not on a SLURM login node? The script is in {path}"
        ) from None
    click.echo(out.stdout.strip())


if __name__ == "__main__":
    main()
