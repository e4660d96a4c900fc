"""The ``automodel`` command line: run YAML recipes locally, under torchrun, or on SLURM."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automodel-recipes")
def main() -> None:
    """Train and fine-tune Hugging Face models from YAML recipes."""


if __name__ == "__main__":
    main()
