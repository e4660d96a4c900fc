"""Preemption: SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the next step and exits cleanly."""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist


class PreemptionFlag:
    """Catches SIGTERM and SIGUSR1 (SLURM's pre-timeout signal) for the duration of training.

    Example:
        >>> flag = PreemptionFlag().install()
        >>> stop = flag.should_stop(distributed=False)
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        """Installs the handlers (remembering the previous ones); returns self."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self, distributed: bool, device: torch.device | None = None) -> bool:
        """Returns True when any rank got a signal (agreed across ranks so all stop together)."""
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a peer's signal"
