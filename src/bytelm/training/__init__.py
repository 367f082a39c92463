"""Training: the typed run config, the training loop with exact resume, schedules, optimizer state, checkpoints,
metrics, and how a model is wrapped for data parallel (bytelm.training.parallel)."""

from .config import RunConfig, TrainConfig
from .schedule import lr_at
from .trainer import LN2, Trainer, log_line, train

__all__ = ["LN2", "RunConfig", "TrainConfig", "Trainer", "log_line", "lr_at", "train"]
