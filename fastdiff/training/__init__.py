"""Training: the objective (time sampling, weighting, label dropout around the fused loss), the loop
(:class:`Trainer`), and checkpoints. See docs/training.md."""

from fastdiff.training.checkpoint import CheckpointError
from fastdiff.training.objective import (STREAM_EPS, STREAM_LABEL_DROPOUT, STREAM_TIME, DiffusionObjective,
                                         training_seeds, uniforms)
from fastdiff.training.score_matching import (STREAM_PROJECTION, ScoreMatchingObjective, ncsn_grid, ncsn_objective,
                                              ncsn_sigmas)
from fastdiff.training.trainer import Trainer

__all__ = ["CheckpointError", "DiffusionObjective", "STREAM_EPS", "STREAM_LABEL_DROPOUT", "STREAM_PROJECTION",
           "STREAM_TIME", "ScoreMatchingObjective", "Trainer", "ncsn_grid", "ncsn_objective", "ncsn_sigmas",
           "training_seeds", "uniforms"]
