"""Training: runtime (device, precision), optimisers and schedules, the loop, checkpoints."""

from .runtime import Runtime  # noqa: F401
from .optim import build_optimizer, LRSchedule, l2_penalty  # noqa: F401
from .callbacks import EarlyStopper  # noqa: F401
from .loop import fit, train_one_epoch, evaluate, predict_logits, TrainingDiverged, TrainingInterrupted  # noqa: F401
from .checkpoint import TrainState, save_checkpoint, read_checkpoint, restore_checkpoint  # noqa: F401
