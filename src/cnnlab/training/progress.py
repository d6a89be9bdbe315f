"""Keras-style epoch lines, with a live progress bar only when stdout is a terminal."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from ..display import printable_lines
from ..runs import format_epoch as format_row


class ProgressLogger:
    """mode: auto (bar on a terminal, plain lines otherwise) | bar | plain | none."""

    def __init__(self, mode: str = "auto", stream=None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self.bar = None
        self._last = 0.0

    def message(self, text: str) -> None:
        """One message; class and file names in it are shown escaped (no raw terminal control codes)."""
        if self.mode != "none":
            print(printable_lines(text), file=self.stream, flush=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """done: steps already made in this epoch (a resumed run)."""
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        if self.mode == "bar":
            self.bar = tqdm(total=steps, initial=done, desc=f"Epoch {epoch}/{epochs}", unit="step", leave=False,
                            file=self.stream, dynamic_ncols=True)

    def batch_end(self, step: int, loss) -> None:
        if self.bar is not None:
            self.bar.update(1)
            now = time.monotonic()
            if now - self._last > 0.25 or step == self.steps:  # .item() syncs: not every step
                self.bar.set_postfix(loss=f"{float(loss):.4f}")
                self._last = now

    def epoch_end(self, row: dict, is_best: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        mark = "  *best" if is_best else ""
        self.message(f"Epoch {self.epoch}/{self.epochs} - {self.steps}/{self.steps} - {format_row(row)}{mark}")
