"""Parsing of human byte sizes such as ``"5GB"`` or ``"500MiB"``."""

from __future__ import annotations

import re

from automodel.ckpt.errors import CheckpointError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Returns ``size`` in bytes; accepts an int or a string like ``"5GB"``, ``"2.5GiB"``, ``"40KB"``.

    Units follow transformers' ``max_shard_size``: KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2.
    """
    if isinstance(size, int):
        value = size
    else:
        match = _PATTERN.match(size)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise CheckpointError(
                f"size {size!r} is not understood; expected a number with an optional unit "
                f"({', '.join(u for u in _UNITS if u)}), e.g. '5GB' or '500MiB'"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise CheckpointError(f"size {size!r} must be positive, e.g. '5GB'")
    return value
