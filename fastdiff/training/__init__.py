"""Training: the objective (time sampling, weighting, label dropout around the fused loss), the loop
(:class:`Trainer`), and checkpoints. See docs/training.md."""

from fastdiff.training.checkpoint import CheckpointError
from fastdiff.training.objective import (STREAM_EPS, STREAM_LABEL_DROPOUT, STREAM_TIME, DiffusionObjective,
                                         training_seeds, uniforms)
from fastdiff.training.trainer import Trainer

__all__ = ["CheckpointError", "DiffusionObjective", "STREAM_EPS", "STREAM_LABEL_DROPOUT", "STREAM_TIME",
           "Trainer", "training_seeds", "uniforms"]
