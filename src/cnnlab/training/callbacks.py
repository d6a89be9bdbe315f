"""Early stopping and best-epoch tracking."""

from __future__ import annotations


def monitor_mode(monitor: str) -> str:
    """Losses improve downwards, accuracies upwards."""
    return "min" if monitor.endswith("loss") else "max"


class EarlyStopper:
    """Tracks the best value of `monitor`; says stop after `patience` epochs without a gain > min_delta.

    patience None: never stops, but still tracks the best epoch (whose weights are kept).
    """

    def __init__(self, monitor: str = "val_loss", patience: int | None = None, min_delta: float = 0.0):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = monitor_mode(monitor)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's value; True when it is a new best."""
        if self.best is None:
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
