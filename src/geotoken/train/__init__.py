"""Training GeoToken models: data assembly by indexing, the resumable loop, validation, DDP."""

from geotoken.train.data import TrainData, batch_rows, epoch_order, holdout_rows, steps_per_epoch
from geotoken.train.loop import (
    SCHEDULES,
    VAL_DECODER,
    VAL_DECODERS,
    WEIGHT_DECAY_ON,
    TrainConfig,
    clip_gradients,
    grad_accum_for,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    train,
    validate,
)

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "VAL_DECODER",
    "VAL_DECODERS",
    "WEIGHT_DECAY_ON",
    "clip_gradients",
    "grad_accum_for",
    "TrainData",
    "batch_rows",
    "epoch_order",
    "holdout_rows",
    "load_checkpoint",
    "lr_at",
    "save_checkpoint",
    "steps_per_epoch",
    "train",
    "validate",
]
