"""Training: the objective (time sampling, weighting, label dropout around the fused loss), the loop
(:class:`Trainer`), and checkpoints. See docs/training.md."""

from fastdiff.training.checkpoint import CheckpointError
from fastdiff.training.objective import (STREAM_EPS, STREAM_LABEL_DROPOUT, STREAM_TIME, DiffusionObjective,
                                         training_seeds, uniforms)
from fastdiff.training.trainer import Trainer


def load_model(path, *, ema: bool = True, device=None):
    """Rebuild a :mod:`fastdiff.models` model from a checkpoint (its .json, .safetensors or folder);
    returns ``(model, state)`` with the EMA weights by default, in eval mode."""
    from fastdiff import models
    from fastdiff.training import checkpoint as ckpt

    tensors, state = ckpt.read(path)
    config = state.get("model_config")
    if not config:
        raise CheckpointError(f"checkpoint {path} has no model_config (the model was not a fastdiff.models "
                              "model): build the model yourself and load the 'model/' or 'ema/' tensors")
    model = models.build(config)
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    if ema:
        weights.update({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # tensors that do not fit the recorded config
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model_config: {e}") from None
    return model.to(device or "cpu").eval(), state


__all__ = ["CheckpointError", "DiffusionObjective", "STREAM_EPS", "STREAM_LABEL_DROPOUT", "STREAM_TIME",
           "Trainer", "load_model", "training_seeds", "uniforms"]
