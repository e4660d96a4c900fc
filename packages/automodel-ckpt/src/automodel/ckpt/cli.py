"""The ``automodel-ckpt`` command line: inspect, verify, merge, reshard, convert and diff checkpoints."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="automodel-ckpt")
def main() -> None:
    """Inspect, verify, merge, reshard, convert and diff Hugging Face / DCP checkpoints."""


if __name__ == "__main__":
    main()
