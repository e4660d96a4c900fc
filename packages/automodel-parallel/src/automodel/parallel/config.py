"""``ParallelConfig``: the mesh sizes and per-strategy options of a run, validated on construction.

A config only states intent. Whether the sizes fit the world (``build_mesh``) and the model
(``parallelize``: heads, layers, experts) is checked where that information exists.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

_AC_MODES = ("none", "full", "selective")
_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_FIELDS = ("param_dtype", "reduce_dtype")
_SIZE_FIELDS = ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


@dataclass(kw_only=True)
class ParallelConfig:
    """Returns a validated description of how to parallelize a model (sizes and options).

    Sizes multiply to the world size: ``dp_replicate * dp_shard * cp * tp * pp``. ``dp_shard=-1``
    takes whatever the other sizes leave. ``ep`` does not add ranks: expert parallelism borrows
    its ranks from ``dp_shard * cp`` (see ``build_mesh``).

    Args:
        dp_replicate: data-parallel replicas (HSDP's replicate dim); 1 = plain FSDP.
        dp_shard: FSDP sharding degree; -1 fills the rest of the world.
        cp: context-parallel degree (sequence sharded for attention).
        tp: tensor-parallel degree.
        pp: pipeline-parallel degree.
        ep: expert-parallel degree (divides ``dp_shard * cp``).
        sequence_parallel: shard norms and residuals over the sequence on the tp dim.
        loss_parallel: keep the logits vocabulary-sharded (a DTensor) after the LM head; compute
            the loss under ``torch.distributed.tensor.parallel.loss_parallel()``.
        activation_checkpointing: ``"none"``; ``"full"`` (keep only each block's input, recompute
            the rest in backward); ``"selective"`` (per op: keep matmul, attention and
            collective outputs, recompute the cheap elementwise ops and norms).
        compile: ``torch.compile`` every block; ``True`` or a dict of ``torch.compile`` kwargs.
        param_dtype: FSDP mixed precision compute dtype (``"bfloat16"``...); None keeps the params'.
        reduce_dtype: FSDP gradient reduce-scatter dtype; None = ``param_dtype``.
        reshard_after_forward: free gathered params after forward (ZeRO-3); False keeps them
            (ZeRO-2, more memory, less communication). The root module never reshards.
        prefetch: how many blocks ahead FSDP all-gathers explicitly (0 = FSDP's implicit one).
        cpu_offload: keep sharded params, grads and optimizer state on the CPU.
        pp_schedule: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"`` or ``"zbv"``.
        pp_microbatches: microbatches per step; None = ``pp * pp_virtual_stages``.
        pp_virtual_stages: stages per pipeline rank (2+ for interleaved schedules and zbv).
        pp_split_points: FQNs of blocks that start a new stage (e.g. ``["model.layers.8"]``);
            None splits the blocks evenly.

    Example:
        >>> ParallelConfig(dp_shard=-1, tp=2).tp
        2
        >>> ParallelConfig.from_dict({"tp": 2, "param_dtype": "bfloat16"}).param_dtype
        torch.bfloat16
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    loss_parallel: bool = False
    activation_checkpointing: str = "none"
    compile: bool | dict[str, Any] = False
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    prefetch: int = 0
    cpu_offload: bool = False
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    pp_virtual_stages: int = 1
    pp_split_points: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in _SIZE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ParallelConfig.{name} must be an int, got {value!r}")
            if name == "dp_shard" and value == -1:
                continue
            if value < 1:
                fix = " or -1 to fill the world" if name == "dp_shard" else ""
                raise ValueError(f"ParallelConfig.{name}={value}: expected >= 1{fix}")
        for name in _DTYPE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):
                if value not in _DTYPES:
                    raise ValueError(
                        f"ParallelConfig.{name}={value!r}: expected one of {sorted(_DTYPES)} or None"
                    )
                setattr(self, name, _DTYPES[value])
            elif value is not None and value not in _DTYPES.values():
                raise ValueError(
                    f"ParallelConfig.{name}={value!r}: expected one of {sorted(_DTYPES)} or None"
                )
        if self.activation_checkpointing not in _AC_MODES:
            raise ValueError(
                f"ParallelConfig.activation_checkpointing={self.activation_checkpointing!r}: "
                f"expected one of {list(_AC_MODES)}"
            )
        if not isinstance(self.compile, bool | dict):
            raise ValueError(
                f"ParallelConfig.compile={self.compile!r}: expected a bool or a dict of "
                "torch.compile keyword arguments"
            )
        if self.prefetch < 0:
            raise ValueError(f"ParallelConfig.prefetch={self.prefetch}: expected >= 0")
        if self.pp_schedule not in _SCHEDULES:
            raise ValueError(
                f"ParallelConfig.pp_schedule={self.pp_schedule!r}: expected one of {list(_SCHEDULES)}"
            )
        if self.pp_virtual_stages < 1:
            raise ValueError(
                f"ParallelConfig.pp_virtual_stages={self.pp_virtual_stages}: expected >= 1"
            )
        if self.pp_schedule in ("interleaved_1f1b", "zbv") and self.pp > 1:
            if self.pp_virtual_stages < 2:
                raise ValueError(
                    f"ParallelConfig.pp_schedule={self.pp_schedule!r} needs pp_virtual_stages >= 2 "
                    f"(got {self.pp_virtual_stages}); set pp_virtual_stages=2 or use '1f1b'"
                )
            if self.pp_schedule == "zbv" and self.pp_virtual_stages != 2:
                raise ValueError(
                    f"ParallelConfig.pp_schedule='zbv' needs exactly pp_virtual_stages=2 "
                    f"(got {self.pp_virtual_stages})"
                )
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ValueError(
                f"ParallelConfig.pp_microbatches={self.pp_microbatches}: expected >= 1 or None"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError(
                "ParallelConfig.sequence_parallel=True needs tp > 1 (it shards over the tp dim); "
                "set tp or drop sequence_parallel"
            )
        if self.loss_parallel and self.tp == 1:
            raise ValueError(
                "ParallelConfig.loss_parallel=True needs tp > 1; set tp or drop loss_parallel"
            )
        if self.cp > 1 and self.ep > 1 and self.ep % self.cp != 0:
            raise ValueError(
                f"ParallelConfig.ep={self.ep} must be a multiple of cp={self.cp}: experts borrow "
                "their ranks from dp_shard * cp"
            )

    def resolved(self, world_size: int) -> ParallelConfig:
        """Returns a copy with ``dp_shard`` resolved for ``world_size`` (sizes checked against it).

        Raises:
            ValueError: if the sizes do not multiply to ``world_size``.
        """
        others = self.dp_replicate * self.cp * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others != 0:
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate*cp*tp*pp={others}; "
                    "choose sizes whose product divides the number of processes"
                )
            dp_shard = world_size // others
        if dp_shard * others != world_size:
            raise ValueError(
                f"ParallelConfig sizes dp_replicate={self.dp_replicate} * dp_shard={dp_shard} * "
                f"cp={self.cp} * tp={self.tp} * pp={self.pp} = {dp_shard * others} != world size "
                f"{world_size}; set dp_shard=-1 or change the sizes to multiply to {world_size}"
            )
        if self.ep > 1:
            borrow = dp_shard * self.cp
            if borrow % self.ep != 0 or self.ep % self.cp != 0:
                raise ValueError(
                    f"ParallelConfig.ep={self.ep} must divide dp_shard*cp={borrow} and be a "
                    f"multiple of cp={self.cp}: expert parallelism borrows its ranks from the "
                    "FSDP and context dims; choose ep among the divisors of dp_shard*cp"
                )
        return dataclasses.replace(self, dp_shard=dp_shard)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        """Returns a config from a plain dict (YAML/JSON); dtypes may be names like ``"bfloat16"``.

        Raises:
            ValueError: on an unknown key, with the closest known key suggested.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown ParallelConfig key {key!r}{hint}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a plain dict (dtypes as names) that ``from_dict`` reads back."""
        out = dataclasses.asdict(self)
        for name in _DTYPE_FIELDS:
            if out[name] is not None:
                out[name] = _dtype_name(out[name])
        return out
