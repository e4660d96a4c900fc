"""``CheckpointManager``: training checkpoints (model as HF safetensors, optimizer through DCP, extra
state, RNG) published atomically, with a ``latest`` pointer, retention and optional async save.

Layout of ``root``::

    root/
      latest                      text "step_200", replaced atomically, written after the rename
      step_100/                   a complete checkpoint; ``from_pretrained("root/step_100")`` works
        config.json  model*.safetensors  [model.safetensors.index.json]
        optimizer/                DCP folder (resharded on load to any mesh)
        trainer_state/rank_00000.pt   per rank: extra objects' state dicts and RNG states
        checkpoint.json           step, world size, contents; written last before the rename
      step_200/
      .partial.step_300/          being written; never returned by ``latest()``

Crash safety: everything is written under ``.partial.step_N`` and fsynced; then rank 0 renames the
folder to ``step_N`` (atomic) and only then replaces ``latest``. A kill at any moment leaves either
the previous ``latest`` or the new, complete one. Stale ``.partial.*`` folders are removed on start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from automodel.ckpt import _collective as coll
from automodel.ckpt._layout import write_text_durably
from automodel.ckpt._size import parse_size
from automodel.ckpt._state import named_tensors
from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.key_map import KeyMap, as_key_map
from automodel.ckpt.loading import load as load_model
from automodel.ckpt.saving import hf_tensors, plan_write, save_configs, write_safetensors

__all__ = ["CheckpointManager"]

_LATEST = "latest"
_MARKER = "checkpoint.json"
_PARTIAL = ".partial."
_TRASH = ".trash."


def _step_dir_name(step: int) -> str:
    return f"step_{step}"


class CheckpointManager:
    """Saves and restores training checkpoints under ``root``; returned paths load in transformers.

    Create it on every rank (it is collective under ``torch.distributed``: it makes its own gloo
    groups so that checkpoint traffic never interleaves with training collectives).

    Args:
        root: folder holding ``step_N`` checkpoints and the ``latest`` pointer.
        keep_last: keep at most this many checkpoints (the latest is never deleted); None keeps all.
        async_save: ``save`` returns once the state is copied to CPU memory and writes in a
            background thread, overlapping training; the next ``save``/``load``/``wait`` waits for it.
        max_shard_size: largest model safetensors file, e.g. ``"5GB"``.
        dtype: dtype of the saved model weights (default: as in memory).
        key_map: in-memory -> checkpoint key mapping for the model (see ``KeyMap``).

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(model.parameters())
        >>> manager = CheckpointManager(tempfile.mkdtemp(), keep_last=2)
        >>> _ = manager.save(10, model=model, optimizer=opt, extra={"epoch": 1})
        >>> extra = {"epoch": 0}; manager.load("latest", model=model, optimizer=opt, extra=extra)
        10
        >>> extra["epoch"]
        1
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        async_save: bool = False,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        key_map: KeyMap | Mapping[str, str] | Callable[[str], str] | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last={keep_last} must be >= 1 (or None to keep all)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self._max_bytes = parse_size(max_shard_size)
        self._dtype = dtype
        self._key_map = as_key_map(key_map)
        self._group: Any = None
        self._dcp_group: Any = None
        if coll.is_distributed():
            self._group = dist.new_group(backend="gloo")
            self._dcp_group = dist.new_group(backend="gloo")
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        if coll.rank(self._group) == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob(_PARTIAL + "*"), *self.root.glob(_TRASH + "*")]:
                shutil.rmtree(stale, ignore_errors=True)
        coll.barrier(self._group)

    # ----------------------------------------------------------------------------------- queries
    def path(self, step: int) -> Path:
        """Returns the folder of checkpoint ``step`` (which may not exist)."""
        return self.root / _step_dir_name(step)

    def steps(self) -> list[int]:
        """Returns the steps of every complete checkpoint under ``root``, ascending."""
        found = []
        for child in self.root.glob("step_*"):
            suffix = child.name.removeprefix("step_")
            if suffix.isdigit() and (child / _MARKER).is_file():
                found.append(int(suffix))
        return sorted(found)

    def latest(self) -> int | None:
        """Returns the step of the latest complete checkpoint, or None when there is none.

        It is the step named by the ``latest`` pointer; without a valid pointer (none written yet,
        or deleted by hand), the highest complete step.
        """
        pointer = self.root / _LATEST
        try:
            name = pointer.read_text().strip()
        except OSError:
            name = ""
        suffix = name.removeprefix("step_")
        if suffix.isdigit() and (self.root / name / _MARKER).is_file():
            return int(suffix)
        steps = self.steps()
        return steps[-1] if steps else None

    # -------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        *,
        model: nn.Module | Mapping[str, torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Returns the folder checkpoint ``step`` is (or, with async_save, will be) published at.

        Args:
            step: training step; names the folder ``step_{step}``.
            model: module or state dict; saved as HF safetensors (+ config when it has one).
            optimizer: saved through DCP (``get_optimizer_state_dict``), needs ``model``.
            extra: name -> object with ``state_dict``/``load_state_dict`` (LR scheduler,
                dataloader, ...) or a plain picklable value. Per rank, with the RNG states.
        """
        self.wait()
        if optimizer is not None and not isinstance(model, nn.Module):
            raise CheckpointError("saving an optimizer needs model= (the nn.Module it optimizes)")
        rank = coll.rank(self._group)
        partial = self.root / f"{_PARTIAL}{_step_dir_name(step)}"
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "trainer_state").mkdir(parents=True)
        coll.barrier(self._group)

        # Snapshot everything on the calling thread (the only part that must not overlap training).
        model_plan = None
        if model is not None:
            tensors = hf_tensors(named_tensors(model), self._key_map, self._dtype)
            model_plan = plan_write(tensors, self._group, copy=self.async_save)
        optim_state = None
        if optimizer is not None:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            assert isinstance(model, nn.Module)
            optim_state = get_optimizer_state_dict(model, optimizer)
            if self.async_save:
                optim_state = _snapshot(optim_state)
        trainer_state = {
            "step": step,
            "extra": {k: _state_of(v) for k, v in (extra or {}).items()},
            "rng": _rng_state(),
        }
        if self.async_save:
            trainer_state = _snapshot(trainer_state)
        if rank == 0 and isinstance(model, nn.Module):
            save_configs(model, partial)
        marker = {
            "step": step,
            "world_size": coll.world_size(self._group),
            "model": model is not None,
            "optimizer": optimizer is not None,
            "extra": sorted(extra or {}),
            "format_version": 1,
        }

        def write() -> None:
            if model_plan is not None:
                write_safetensors(model_plan, partial, self._max_bytes, self._group)
            if optim_state is not None:
                import torch.distributed.checkpoint as dcp

                with coll.quiet_single_process():
                    dcp.save(
                        optim_state,
                        checkpoint_id=str(partial / "optimizer"),
                        process_group=self._dcp_group,
                        no_dist=not coll.is_distributed(),
                    )
            _save_durably(trainer_state, partial / "trainer_state" / f"rank_{rank:05d}.pt")
            coll.barrier(self._group)
            if rank == 0:
                self._publish(step, partial, marker)
            coll.barrier(self._group)

        if not self.async_save:
            write()
        else:
            self._pending = threading.Thread(target=self._run, args=(write,), daemon=True)
            self._pending.start()
        return self.path(step)

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # surfaced by wait() on the training thread
            self._error = e

    def wait(self) -> None:
        """Blocks until a pending async save is published; re-raises its error if it failed."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _publish(self, step: int, partial: Path, marker: dict[str, Any]) -> None:
        write_text_durably(partial / _MARKER, json.dumps(marker, indent=2) + "\n")
        final = self.path(step)
        trash = None
        if final.exists():  # re-saving a step: move the old one aside, atomically
            trash = self.root / f"{_TRASH}{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
        os.rename(partial, final)
        _fsync_dir(self.root)
        write_text_durably(self.root / _LATEST, final.name + "\n")
        _fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self._apply_retention(step)

    def _apply_retention(self, latest: int) -> None:
        if self.keep_last is None:
            return
        others = [s for s in self.steps() if s != latest]
        doomed = others[: max(0, len(others) - (self.keep_last - 1))]
        for old in doomed:
            # Rename first so a crash mid-delete never leaves a half-deleted step_N behind.
            trash = self.root / f"{_TRASH}{_step_dir_name(old)}"
            os.rename(self.path(old), trash)
            shutil.rmtree(trash, ignore_errors=True)

    # -------------------------------------------------------------------------------------- load
    def load(
        self,
        step: int | str = "latest",
        *,
        model: nn.Module | MutableMapping[str, torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: dict[str, Any] | None = None,
        restore_rng: bool = True,
        strict: bool = True,
    ) -> int:
        """Returns the step restored from checkpoint ``step`` (an int or ``"latest"``).

        The model may be sharded differently than at save time (any mesh, any world size): each
        rank reads its slices. Objects in ``extra`` with ``load_state_dict`` are restored in place;
        other entries of ``extra`` are replaced by their saved values. Each rank restores its own
        RNG states (rank 0's when the world grew). Trainer state is unpickled: load only trusted
        checkpoints.
        """
        self.wait()
        if step == "latest":
            found = self.latest()
            if found is None:
                raise CheckpointError(f"{self.root} holds no complete checkpoint to load")
            step = found
        if not isinstance(step, int):
            raise CheckpointError(f"step must be an int or 'latest', got {step!r}")
        folder = self.path(step)
        if not (folder / _MARKER).is_file():
            raise CheckpointError(
                f"{folder} is not a complete checkpoint; complete steps: {self.steps()}"
            )
        marker = json.loads((folder / _MARKER).read_text())
        if model is not None:
            if not marker["model"]:
                raise CheckpointError(f"{folder} holds no model state (saved without model=)")
            load_model(model, folder, key_map=self._key_map, strict=strict, process_group=None)
        if optimizer is not None:
            if not marker["optimizer"] or not isinstance(model, nn.Module):
                raise CheckpointError(
                    f"{folder}: loading an optimizer needs model= and a checkpoint saved with one"
                )
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_optimizer_state_dict,
                set_optimizer_state_dict,
            )

            state = get_optimizer_state_dict(model, optimizer)
            with coll.quiet_single_process():
                dcp.load(
                    state,
                    checkpoint_id=str(folder / "optimizer"),
                    process_group=self._dcp_group,
                    no_dist=not coll.is_distributed(),
                )
            set_optimizer_state_dict(model, optimizer, state)
        rank = coll.rank(self._group)
        state_file = folder / "trainer_state" / f"rank_{rank:05d}.pt"
        if not state_file.is_file():
            state_file = folder / "trainer_state" / "rank_00000.pt"
        trainer_state = torch.load(state_file, weights_only=False, map_location="cpu")
        for name, value in (extra or {}).items():
            if name not in trainer_state["extra"]:
                raise CheckpointError(
                    f"{folder} has no extra state {name!r}; it has {sorted(trainer_state['extra'])}"
                )
            if callable(getattr(value, "load_state_dict", None)):
                value.load_state_dict(trainer_state["extra"][name])
            else:
                extra[name] = trainer_state["extra"][name]  # type: ignore[index]
        if restore_rng:
            _set_rng_state(trainer_state["rng"])
        return step


def _state_of(value: Any) -> Any:
    return value.state_dict() if callable(getattr(value, "state_dict", None)) else value


def _snapshot(obj: Any) -> Any:
    """Returns a deep copy of ``obj`` whose tensors are detached CPU copies (for async save)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.detach().clone()
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        numpy.random.set_state(state["numpy"])


def _save_durably(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
