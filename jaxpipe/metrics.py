"""Training metrics: the per-step record, JSON-lines logging and the progress bar."""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple


class StepMetrics(NamedTuple):
    """One optimizer step's metrics, as callbacks and the metrics file see them.

    Attributes:
      step: the step just taken (1-based: the number of steps done).
      loss: its mean training loss.
      step_time_s: its wall time in seconds (the first step of a call
        includes compilation).
      examples_per_s: global batch rows divided by ``step_time_s``.
      grad_norm: the gradient's global norm.
      eval_loss: the mean loss over ``eval_data`` after this step, or
        ``None`` when it was not evaluated at this step.
    """

    step: int
    loss: float
    step_time_s: float
    examples_per_s: float
    grad_norm: float
    eval_loss: float | None = None

    def as_dict(self) -> dict:
        """The metrics as a JSON-ready dict, without ``eval_loss`` when not evaluated."""
        out = self._asdict()
        if out["eval_loss"] is None:
            del out["eval_loss"]
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in out.items()}


class MetricsFile:
    """A JSON-lines metrics file, one object per logged step.

    Opening it for a run that starts at step ``start`` drops the lines of
    later steps (written by a run that went past its last checkpoint before
    it died), so the file reads as one run.

    Args:
      path: the file; its folder is created if missing.
      start: the step the run starts from (0 for a fresh run).
    """

    def __init__(self, path: str | os.PathLike, start: int):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        kept = []
        if start and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a")

    def write(self, metrics: StepMetrics) -> None:
        """Appends one line and flushes it."""
        self._file.write(json.dumps(metrics.as_dict()) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        self._file.close()


class Progress:
    """A tqdm bar with the step, loss, step time and examples/s; silent when disabled.

    Args:
      steps: the total number of steps.
      start: steps already done (a resumed run).
      enabled: whether to show the bar.
    """

    def __init__(self, steps: int, start: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=steps, initial=start, desc="train", unit="step")

    def update(self, metrics: StepMetrics, show: bool) -> None:
        """Advances one step; refreshes the numbers when ``show``."""
        if self._bar is None:
            return
        if show:
            postfix = {
                "loss": f"{metrics.loss:.4f}",
                "step_s": f"{metrics.step_time_s:.3g}",
                "ex/s": f"{metrics.examples_per_s:.3g}",
            }
            if metrics.eval_loss is not None:
                postfix["eval"] = f"{metrics.eval_loss:.4f}"
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Prints a line above the bar (nothing when disabled)."""
        if self._bar is not None:
            self._bar.write(message)

    def close(self) -> None:
        """Closes the bar."""
        if self._bar is not None:
            self._bar.close()
