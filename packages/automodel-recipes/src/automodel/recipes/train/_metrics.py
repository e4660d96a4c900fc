"""Metrics sinks: console lines (`loss=...`), a JSONL file, TensorBoard, W&B and MLflow when set."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from automodel.recipes.config import LoggingSection


class MetricsLogger:
    """Writes one record per log step to every configured sink (main rank only).

    Example:
        >>> log = MetricsLogger(LoggingSection(), Path("out"), enabled=True)
        >>> log.write(10, {"loss": 2.3, "lr": 1e-3})
    """

    def __init__(
        self,
        cfg: LoggingSection,
        output_dir: Path,
        enabled: bool,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb: Any = None
        self._wandb: Any = None
        self._mlflow: Any = None
        self.bar: Any = None
        if not enabled:
            return
        if cfg.jsonl:
            self._jsonl = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("warning: logging.tensorboard=true but tensorboard is not installed; skipped")
        if cfg.wandb is not None:
            try:
                import wandb

                self._wandb = wandb.init(
                    project=cfg.wandb.project,
                    mode=cfg.wandb.mode,
                    dir=str(output_dir),
                    config=config,
                )
            except ImportError:
                print("warning: logging.wandb is set but wandb is not installed; skipped")
        if cfg.mlflow is not None:
            try:
                import mlflow

                if cfg.mlflow.tracking_uri:
                    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
                else:
                    mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
                mlflow.set_experiment(cfg.mlflow.experiment)
                self._mlflow = mlflow
                mlflow.start_run()
            except ImportError:
                print("warning: logging.mlflow is set but mlflow is not installed; skipped")

    def print(self, line: str) -> None:
        """Prints a console line (above the progress bar when one is shown)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        """Records ``metrics`` at ``step`` in every sink (console excluded)."""
        if not self.enabled:
            return
        named = {f"{prefix}{k}": v for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **named}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in named.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(named, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(named, step=step)

    def close(self) -> None:
        """Flushes and closes every sink."""
        if self.bar is not None:
            self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def format_duration(seconds: float) -> str:
    """Returns ``1h02m03s`` / ``2m03s`` / ``3s`` for a duration."""
    s = int(seconds)
    h, m = s // 3600, s % 3600 // 60
    if h:
        return f"{h}h{m:02d}m{s % 60:02d}s"
    return f"{m}m{s % 60:02d}s" if m else f"{s}s"


def stdout_is_terminal() -> bool:
    return sys.stderr.isatty()
